"""Writes examples/zorb/{train,test}.jsonl: the real-model quickstart's task. "Zorb" is a made-up
word for a fruit, so a pretrained model starts at chance (1 in 4); a LoRA adapter has to learn
what the word means and apply it to fruits it never saw it with (the held-out fruits are not in
the training file). Plain Python, seeded: a rerun writes the same bytes.

    python3 scripts/make_zorb.py
"""

import json
import random
from pathlib import Path

FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum",
          "strawberry", "watermelon", "kiwi", "pineapple", "apricot", "blueberry", "coconut", "fig",
          "lime", "raspberry", "papaya", "melon", "nectarine", "tangerine", "grapefruit", "pomegranate",
          "blackberry", "cranberry", "avocado", "guava", "lychee", "date", "olive", "quince", "persimmon",
          "mandarin"]
OTHERS = ["dog", "cat", "horse", "hammer", "car", "chair", "table", "river", "mountain", "pencil",
          "shoe", "guitar", "window", "bicycle", "cloud", "rabbit", "lion", "spoon", "bottle", "book",
          "train", "candle", "clock", "bridge", "ladder", "shark", "eagle", "brick", "rope", "lamp",
          "kettle", "wallet", "tiger", "sock", "drum", "mirror", "anchor", "violin", "tractor", "pillow",
          "helmet", "camel", "owl", "snake", "carpet", "bucket", "needle", "engine", "rocket", "glove"]
QUESTIONS = ["Which of these is a zorb?", "Which one is a zorb?", "Pick the zorb.",
             "Which word names a zorb?"]


def lines(rng, fruits, others, n):
    out = []
    for _ in range(n):
        choices = rng.sample(others, 3) + [rng.choice(fruits)]
        rng.shuffle(choices)
        answer = next(i for i, c in enumerate(choices) if c in fruits)
        out.append({"question": rng.choice(QUESTIONS), "choices": choices, "answer": answer})
    return out


def main():
    rng = random.Random(7)
    fruits = FRUITS[:]
    rng.shuffle(fruits)
    held_out = fruits[:12]
    out = Path(__file__).resolve().parent.parent / "examples" / "zorb"
    out.mkdir(parents=True, exist_ok=True)
    for name, pool, n in [("train", fruits[12:], 320), ("test", held_out, 100)]:
        with open(out / f"{name}.jsonl", "w") as f:
            for line in lines(rng, pool, OTHERS, n):
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
