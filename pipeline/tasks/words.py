"""Built-in vocabulary for synthetic tasks: keys, values and word lists without downloads.

RULER draws needle keys as ``adjective-noun`` pairs and common-words lists from the
``wonderwords`` package; here a fixed, curated list stands in so generation needs nothing
beyond the standard library. All draws take an explicit ``random.Random``.
"""

from __future__ import annotations

import random
import string
import uuid

ADJECTIVES = """
able absent abundant acid active actual adorable afraid agile alert alive ample ancient angry
anxious aromatic artistic ashamed awake aware bald barren basic bitter blank bold bouncy brave
brief bright brisk broad bumpy busy calm careful casual cheap cheerful chilly civil clean clever
cloudy clumsy coastal cold colossal comfy common cool cosmic cozy crafty crisp crooked cruel
curious curly damp dark deep delicate dense dizzy dry dusty eager early earthy easy elastic
elegant empty endless equal exotic faint fancy fast feeble fierce flat fluffy foggy fragile
free fresh friendly frozen funny fuzzy gentle giant glad glossy golden grand greasy great green
grumpy hairy happy hard hasty heavy hidden hollow honest huge humble hungry icy idle jolly juicy
keen kind large lazy lean little lively lonely loud loyal lucky lush magic massive mellow merry
mighty misty modern moist muddy narrow neat nervous noble noisy odd old orange pale patient
plain polite proud purple quick quiet rapid rare raw ready red rich rigid ripe rough round royal
rustic sad salty sandy scary shaggy sharp shiny short shy silent silky silly simple sleepy slim
slow small smooth snowy soft solid sour spicy steady steep sticky stormy strange strict strong
sturdy sunny super sweet swift tall tame tender thick thin tidy tiny tough tricky ugly upbeat
vast velvet vivid warm weak wealthy weary wet whole wide wild windy wise witty wooden young zany
""".split()

NOUNS = """
acorn actor airport album alley anchor angle ankle apple apron arch arena armor arrow atlas
attic author avenue badge bagel bakery ballet balloon bamboo banana bandit banjo barn barrel
basket battery beach beacon beard beetle bell bench berry bicycle blanket blossom boat bonnet
bottle boulder bracelet branch bread breeze brick bridge broom bucket buffalo bugle butter
button cabin cable cactus camel camera candle canoe canyon captain carpet carrot castle cattle
cave cellar chair chapel cherry chimney circus citizen cliff clock cloud clover coast cobweb
coconut coffee comet compass copper coral cottage cotton cousin crayon cricket crown crystal
cushion daisy dancer desert diamond dinner doctor dolphin donkey dragon drawer drum eagle
elbow elephant engine falcon farmer feather fence ferry fiddle finger fireplace flag flute
forest fountain fox garden garlic gate giraffe glacier glove goose granite grape guitar hammer
harbor harp hawk helmet hermit hill honey horizon horse island jacket jelly jewel jungle kettle
kitten ladder lagoon lake lantern lemon lettuce library lighthouse lion lizard lobster locket
magnet mango maple marble meadow melon mirror monkey moon mountain muffin museum needle nest
ocean octopus olive onion orchard otter owl oyster paddle palace panda panther parrot peach
pearl pebble pencil penguin pepper piano pigeon pillow pilot pine planet plum pocket pond
potato pumpkin puppet quilt rabbit raccoon radish rainbow raven ribbon river robot rocket
saddle sailor salmon sandal scarf shadow shell shovel silver sketch sparrow spider spoon
squirrel stable statue stone storm stream sugar summit sunflower swan sweater table teapot
temple tiger timber toast tomato tower tractor trumpet tulip tunnel turtle umbrella valley
vase village violin volcano wagon walnut walrus window wizard wolf yacht zebra
""".split()

VERBS = """
arrive bake bend blink borrow bounce build carry chase climb collect cook crawl dance dig dive
drift echo explore fetch float fold gather glide grow hike hover hum juggle jump knit laugh
launch lift listen march melt mend nibble paint paddle plant polish pour race read repair ride
roam row sail scribble sew shine sing skate sketch slide sneeze sort spin splash sprint stack
stir swim swing tickle travel tumble twirl wander whisper whistle wiggle write yawn
""".split()


def single_words() -> list[str]:
    """The distinct single words, in a fixed order."""
    seen: dict[str, None] = {}
    for word in NOUNS + ADJECTIVES + VERBS:
        seen.setdefault(word, None)
    return list(seen)


def random_key(rng: random.Random) -> str:
    """A needle key like RULER's: ``adjective-noun``."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def distinct_keys(rng: random.Random, count: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = random_key(rng)
        if key not in keys:
            keys.append(key)
    return keys


def random_value(rng: random.Random, kind: str = "numbers") -> str:
    """A needle value: a 7-digit number, a word, or a UUID (RULER's three value types)."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return random_key(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown value type {kind!r}; choose numbers, words or uuids")


def distinct_values(rng: random.Random, count: int, kind: str = "numbers", avoid=()) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = random_value(rng, kind)
        if value not in values and value not in avoid:
            values.append(value)
    return values


def variable_name(rng: random.Random, length: int = 5) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(length))


def vocabulary(rng: random.Random, count: int) -> list[str]:
    """`count` distinct words: the single words first (shuffled), then ``adjective-noun`` compounds.

    The order for a given rng is fixed, so a longer list extends a shorter one.
    """
    singles = single_words()
    rng.shuffle(singles)
    if count <= len(singles):
        return singles[:count]
    taken = set(singles)
    words = list(singles)
    while len(words) < count:
        compound = random_key(rng)
        if compound not in taken:
            taken.add(compound)
            words.append(compound)
    return words
