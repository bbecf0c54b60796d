"""Which of COCO's 80 object classes a caption names: the word table behind CHAIR, the evidence head and
the grounded decoding.

A caption "names" a class when one of its words (or two-word phrases) is a synonym of it: men, woman, kid
-> person; puppy, terrier -> dog; sofa -> couch. Two-word phrases win over their parts, so "hot dog" is
food and not a dog, "teddy bear" is a toy and not a bear. "orange" is a colour far more often than a fruit in
captions ("a girl in an orange shirt"), so it counts as the fruit only when no word follows it that it could
be colouring.
"""
from __future__ import annotations

import re

# class -> synonyms (singular; regular plurals are added below, irregular ones listed). Our own list, written
# for captions: COCO's class names plus the words people use for them in Flickr8k and COCO captions.
COCO_OBJECTS: dict[str, list[str]] = {
    "person": ["person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid",
               "baby", "babies", "toddler", "guy", "lady", "ladies", "player", "skier", "surfer", "snowboarder",
               "skateboarder", "rider", "biker", "bicyclist", "cyclist", "crowd", "teenager", "teen", "adult",
               "gentleman", "gentlemen", "worker", "chef", "officer", "policeman", "policemen", "soldier",
               "athlete", "pitcher", "batter", "catcher", "umpire", "dancer", "swimmer", "climber", "hiker",
               "runner", "jockey", "cowboy", "mother", "father", "daughter", "son", "brother", "sister",
               "friend", "student", "audience", "spectator", "someone", "tourist", "pedestrian", "family",
               "wrestler", "boxer", "motorcyclist", "performer", "musician", "guitarist", "singer", "bride",
               "groom", "grandmother", "grandfather", "infant", "youngster", "team"],
    "bicycle": ["bicycle", "bike", "tricycle", "unicycle"],
    "car": ["car", "taxi", "cab", "sedan", "jeep", "van", "minivan", "suv", "convertible", "automobile"],
    "motorcycle": ["motorcycle", "motorbike", "motor bike", "dirt bike", "scooter", "moped", "motocross"],
    "airplane": ["airplane", "plane", "jet", "aircraft", "airliner", "jetliner", "aeroplane"],
    "bus": ["bus", "busses"],
    "train": ["train", "locomotive", "tram", "trolley", "subway"],
    "truck": ["truck", "pickup", "lorry", "fire truck", "firetruck"],
    "boat": ["boat", "ship", "kayak", "canoe", "sailboat", "yacht", "raft", "ferry", "rowboat", "paddleboat", "jet ski"],
    "traffic light": ["traffic light", "stoplight", "stop light", "traffic signal"],
    "fire hydrant": ["fire hydrant", "hydrant"],
    "stop sign": ["stop sign"],
    "parking meter": ["parking meter"],
    "bench": ["bench"],
    "bird": ["bird", "pigeon", "duck", "seagull", "gull", "goose", "geese", "swan", "parrot", "eagle", "owl",
             "hawk", "crow", "penguin", "flamingo", "pelican", "chicken", "hen", "rooster", "sparrow"],
    "cat": ["cat", "kitten", "kitty"],
    "dog": ["dog", "puppy", "puppies", "pup", "poodle", "terrier", "retriever", "collie", "labrador", "dachshund",
            "husky", "huskies", "chihuahua", "pug", "beagle", "greyhound", "bulldog", "spaniel", "dalmatian",
            "german shepherd", "sheepdog", "pit bull", "pitbull", "doberman", "rottweiler", "schnauzer", "corgi",
            "mutt", "hound"],
    "horse": ["horse", "pony", "ponies", "foal", "stallion", "mare"],
    "sheep": ["sheep", "lamb"],
    "cow": ["cow", "cattle", "bull", "calf", "calves", "ox", "oxen"],
    "elephant": ["elephant"],
    "bear": ["bear", "polar bear", "grizzly"],
    "zebra": ["zebra"],
    "giraffe": ["giraffe"],
    "backpack": ["backpack", "rucksack"],
    "umbrella": ["umbrella", "parasol"],
    "handbag": ["handbag", "purse"],
    "tie": ["tie", "necktie", "bowtie", "bow tie"],
    "suitcase": ["suitcase", "luggage"],
    "frisbee": ["frisbee"],
    "skis": ["skis"],
    "snowboard": ["snowboard"],
    "sports ball": ["ball", "soccer ball", "tennis ball", "football", "basketball", "volleyball", "softball"],
    "kite": ["kite"],
    "baseball bat": ["bat", "baseball bat"],
    "baseball glove": ["glove", "mitt", "baseball glove"],
    "skateboard": ["skateboard", "skate board"],
    "surfboard": ["surfboard", "surf board"],
    "tennis racket": ["racket", "racquet", "tennis racket"],
    "bottle": ["bottle"],
    "wine glass": ["wine glass", "wineglass"],
    "cup": ["cup", "mug", "coffee cup", "teacup"],
    "fork": ["fork"],
    "knife": ["knife", "knives"],
    "spoon": ["spoon"],
    "bowl": ["bowl"],
    "banana": ["banana"],
    "apple": ["apple"],
    "sandwich": ["sandwich", "burger", "hamburger"],
    "orange": ["orange"],
    "broccoli": ["broccoli"],
    "carrot": ["carrot"],
    "hot dog": ["hot dog", "hotdog"],
    "pizza": ["pizza"],
    "donut": ["donut", "doughnut"],
    "cake": ["cake", "cupcake"],
    "chair": ["chair", "stool"],
    "couch": ["couch", "sofa"],
    "potted plant": ["potted plant", "houseplant", "plant"],
    "bed": ["bed"],
    "dining table": ["table", "dining table", "desk"],
    "toilet": ["toilet"],
    "tv": ["tv", "television", "tvs"],
    "laptop": ["laptop", "computer", "notebook computer"],
    "mouse": ["mouse", "mice"],
    "remote": ["remote", "remote control", "controller"],
    "keyboard": ["keyboard"],
    "cell phone": ["phone", "cellphone", "cell phone", "smartphone", "telephone"],
    "microwave": ["microwave"],
    "oven": ["oven", "stove"],
    "toaster": ["toaster"],
    "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge"],
    "book": ["book"],
    "clock": ["clock"],
    "vase": ["vase"],
    "scissors": ["scissors"],
    "teddy bear": ["teddy bear", "teddy", "stuffed animal"],
    "hair drier": ["hair drier", "hair dryer", "hairdryer", "blow dryer"],
    "toothbrush": ["toothbrush"],
}

# What may follow "orange" when it is the fruit; any other word means it is colouring that word.
_FRUIT_FOLLOWERS = frozenset(", . and or on in with is are sits sitting next slice slices juice peel".split())
_NO_PLURAL = frozenset(("people", "children", "sheep", "cattle", "scissors", "skis", "luggage", "team", "crowd",
                        "audience", "family"))


def _plurals(word: str) -> list[str]:
    *head, last = word.split(" ")
    if last in _NO_PLURAL or last.endswith(("men", "ies", "ren")):
        return [word]
    if last.endswith("y") and last[-2:-1] not in "aeiou":
        forms = [last[:-1] + "ies"]
    elif last.endswith(("s", "x", "ch", "sh")):
        forms = [last + "es"]
    elif last.endswith("fe"):
        forms = [last[:-2] + "ves", last + "s"]
    else:
        forms = [last + "s", last + "es"]
    return [word] + [" ".join(head + [f]) for f in forms]


def _build_table() -> dict[str, str]:
    table = {}
    for cls, words in COCO_OBJECTS.items():
        for w in words:
            for form in _plurals(w):
                table.setdefault(form, cls)
    return table


WORD_TO_OBJECT: dict[str, str] = _build_table()  # every synonym form -> its class
_MAX_PHRASE = max(len(w.split(" ")) for w in WORD_TO_OBJECT)
_TOKEN = re.compile(r"[a-z]+")


def caption_words(caption: str | list[str]) -> list[str]:
    """Lower-case word tokens of a caption (a string or a token list)."""
    text = caption if isinstance(caption, str) else " ".join(caption)
    return _TOKEN.findall(text.lower().replace("'s", ""))


def find_objects(caption: str | list[str]) -> list[tuple[str, str]]:
    """[(word as written, class)] for every object a caption names, in order; longest phrase first."""
    words = caption_words(caption)
    found, i = [], 0
    while i < len(words):
        step = 1
        for n in range(min(_MAX_PHRASE, len(words) - i), 0, -1):
            phrase = " ".join(words[i:i + n])
            cls = WORD_TO_OBJECT.get(phrase)
            if cls is None:
                continue
            if phrase == "orange" and i + 1 < len(words) and words[i + 1] not in _FRUIT_FOLLOWERS:
                break  # a colour
            found.append((phrase, cls))
            step = n
            break
        i += step
    return found


def object_classes(caption: str | list[str]) -> set[str]:
    return {cls for _, cls in find_objects(caption)}


def vocab_object_ids(itos: list[str]) -> dict[str, list[int]]:
    """class -> ids of the vocabulary's one-word synonyms of it (what grounded decoding can steer)."""
    out: dict[str, list[int]] = {}
    for i, w in enumerate(itos):
        cls = WORD_TO_OBJECT.get(w)
        if cls is not None and w != "orange":  # the colour "orange" must stay sayable
            out.setdefault(cls, []).append(i)
    return out
