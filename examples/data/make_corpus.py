"""Generate the example corpus (examples/data/corpus.txt): English-like text from a small grammar.

The text is generated, not copied from anywhere, so it carries no licence terms. It mixes
templated sentences with counting and arithmetic facts, which gives a small character-level
model real structure to learn within a few hundred steps. Deterministic: seed 1234.
Run: python examples/data/make_corpus.py > examples/data/corpus.txt
"""
import random

SUBJECTS = ["the old miller", "a young fox", "the river", "my sister", "the north wind", "a tired sailor",
            "the small bakery", "our teacher", "the grey cat", "a careful engineer", "the village choir",
            "the lighthouse keeper", "a quiet student", "the market", "the mountain road", "an honest judge"]
VERBS = ["watched", "carried", "remembered", "followed", "painted", "repaired", "counted", "answered",
         "visited", "described", "measured", "welcomed", "guarded", "praised", "forgot", "found"]
OBJECTS = ["the harvest moon", "a basket of apples", "the broken bridge", "every lantern in town",
           "the first snow", "a letter from the coast", "the long winter", "the wooden boats",
           "the evening bells", "a map of the valley", "the stone wall", "the empty station"]
ADVERBS = ["slowly", "at dawn", "without a word", "before the storm", "with great care", "once again",
           "in the morning", "for many years", "quite happily", "under the stars"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ADVERBS)}."
        return s[0].upper() + s[1:]
    if kind < 0.8:
        a, b = rng.randrange(10), rng.randrange(9)
        return f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    start = rng.randrange(10)
    return "Counting: " + ", ".join(NUMBERS[start:start + 5]) + "."


def main(n_paragraphs: int = 2500) -> None:
    rng = random.Random(1234)
    for _ in range(n_paragraphs):
        print(" ".join(sentence(rng) for _ in range(rng.randint(3, 7))))


if __name__ == "__main__":
    main()
