"""Training text for the reference models, written for this package.

Both models learn the same small body of facts. The base model sees them as plain prose
paragraphs; the teacher sees them as ChatML conversations whose assistant turns end
with ``<|im_end|>`` and then ``<|endoftext|>`` — the way a base model and an instruct
model differ. Everything is generated deterministically from the lists below.
"""

from __future__ import annotations

import random

# (subject, question, answer sentences)
FACTS: list[tuple[str, str, list[str]]] = [
    (
        "water",
        "What is water made of?",
        ["Water is made of hydrogen and oxygen.", "Each molecule has two hydrogen atoms and one oxygen atom."],
    ),
    (
        "the sun",
        "What is the sun?",
        ["The sun is a star at the center of our solar system.", "It gives the earth light and heat."],
    ),
    (
        "the moon",
        "Why does the moon shine?",
        ["The moon shines because it reflects light from the sun.", "It does not make light of its own."],
    ),
    (
        "plants",
        "How do plants make food?",
        ["Plants make food from light, water and air.", "This process is called photosynthesis."],
    ),
    (
        "bees",
        "Why are bees important?",
        ["Bees carry pollen from flower to flower.", "Many fruits and vegetables need bees to grow."],
    ),
    (
        "rain",
        "Where does rain come from?",
        ["Rain comes from clouds.", "Water rises as vapor, cools, and falls back as drops."],
    ),
    (
        "the heart",
        "What does the heart do?",
        ["The heart pumps blood through the body.", "Blood carries oxygen to every cell."],
    ),
    (
        "sleep",
        "Why do people need sleep?",
        ["Sleep lets the body rest and repair itself.", "The brain sorts memories while we sleep."],
    ),
    (
        "a computer",
        "What does a computer do?",
        ["A computer follows instructions to process information.", "It stores numbers, text and pictures as bits."],
    ),
    (
        "the ocean",
        "Why is the ocean salty?",
        ["The ocean is salty because rivers carry minerals into it.", "When water evaporates, the salt stays behind."],
    ),
    (
        "gravity",
        "What is gravity?",
        ["Gravity is the force that pulls things toward each other.", "It keeps the planets in orbit around the sun."],
    ),
    (
        "a rainbow",
        "How does a rainbow form?",
        ["A rainbow forms when sunlight passes through drops of rain.", "The light bends and splits into colors."],
    ),
    (
        "bread",
        "How is bread made?",
        ["Bread is made from flour, water, salt and yeast.", "The dough rises and is baked in an oven."],
    ),
    (
        "the wind",
        "What causes wind?",
        [
            "Wind is air moving from high pressure to low pressure.",
            "The sun heats the ground unevenly and the air moves.",
        ],
    ),
    (
        "trees",
        "Why do trees lose their leaves?",
        ["Many trees lose their leaves in autumn to save water.", "New leaves grow again in spring."],
    ),
    (
        "a volcano",
        "What is a volcano?",
        ["A volcano is an opening in the ground where hot rock comes out.", "The melted rock is called lava."],
    ),
    (
        "the brain",
        "What does the brain do?",
        ["The brain controls thinking, movement and the senses.", "It sends signals through the nerves."],
    ),
    (
        "salt",
        "What is salt?",
        ["Salt is a mineral made of sodium and chlorine.", "People use it to flavor and keep food."],
    ),
    (
        "a map",
        "What is a map for?",
        ["A map shows where places are and how to reach them.", "It draws a large area on a small page."],
    ),
    (
        "music",
        "What is music?",
        ["Music is sound arranged in time with rhythm and melody.", "People sing and play instruments to make it."],
    ),
    (
        "fire",
        "What does fire need?",
        ["Fire needs heat, fuel and oxygen.", "Take away one of them and the fire goes out."],
    ),
    (
        "ice",
        "Why does ice float?",
        ["Ice floats because it is lighter than the same amount of water.", "Water expands when it freezes."],
    ),
    (
        "a library",
        "What is a library?",
        ["A library is a place that keeps books for people to read.", "Many libraries also lend music and films."],
    ),
    (
        "the earth",
        "How long does the earth take to go around the sun?",
        ["The earth goes around the sun once a year.", "It also turns once a day, which gives day and night."],
    ),
    (
        "milk",
        "Where does milk come from?",
        ["Milk comes from cows, goats and other mammals.", "It has water, fat, sugar and protein."],
    ),
    (
        "a seed",
        "What is inside a seed?",
        ["A seed holds a tiny plant and a store of food.", "With water and warmth it starts to grow."],
    ),
    (
        "thunder",
        "What makes thunder?",
        ["Thunder is the sound of air heated by lightning.", "The hot air expands so fast that it booms."],
    ),
    (
        "a bridge",
        "What does a bridge do?",
        ["A bridge carries a road or a path over water or a valley.", "It spreads the weight to strong supports."],
    ),
    (
        "numbers",
        "What is a prime number?",
        ["A prime number has exactly two divisors, one and itself.", "Two, three, five and seven are prime."],
    ),
    (
        "the sky",
        "Why is the sky blue?",
        [
            "The sky is blue because air scatters blue light more than red light.",
            "At sunset the light travels farther and looks red.",
        ],
    ),
]

# Facts with text beyond ASCII (accents, Greek, CJK, emoji: 2-, 3- and 4-byte UTF-8), for
# the BPE presets, whose tokens then hold parts of characters.
WORLD_FACTS: list[tuple[str, str, list[str]]] = [
    ("coffee", "What is café au lait?", ["Café au lait is coffee with hot milk ☕.", "In Spain it is café con leche."]),
    ("Tokyo", "What is Tokyo called in Japanese?", ["Tokyo is 東京 in Japanese.", "東京 means eastern capital."]),
    ("Zürich", "Where is Zürich?", ["Zürich is a city in Switzerland.", "People there say Grüezi to say hello 👋."]),
    ("Greece", "What do Greeks call Greece?", ["Greeks call their country Ελλάδα.", "Its capital is Αθήνα, Athens."]),
    (
        "naïve",
        "How is naïve spelled?",
        ["The word naïve has two dots over the i.", "So do the words coöperate and Noël."],
    ),
    ("π", "What is π?", ["π is about 3.14159.", "It is the ratio of a circle's circumference to its diameter 🔵."]),
]

OPENERS = ["In short,", "As a rule,", "Most of the time,", "Put simply,", "It is worth knowing that", "Of course,"]
CONNECTORS = ["Also,", "In the same way,", "For example,", "Then again,", "Because of this,", "Later,"]
NARRATIVE = [
    "The old man walked to the market in the morning.",
    "She opened the window and looked at the quiet street.",
    "The children played by the river until it grew dark.",
    "He wrote a letter to his friend in the city.",
    "The train left the station at six o'clock.",
    "A small dog waited by the door for its owner.",
    "They planted a garden behind the house.",
    "The teacher read a story to the class.",
    "It had rained all night and the roads were wet.",
    "We climbed the hill and saw the whole valley.",
]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly teacher who answers briefly."]
EOS = "<|endoftext|>"


def _lower_first(s: str) -> str:
    return s[0].lower() + s[1:] if s else s


def base_documents(seed: int = 0, n: int = 700, facts: list[tuple[str, str, list[str]]] | None = None) -> list[str]:
    """Plain prose paragraphs, each ending with the end-of-text token."""
    rng = random.Random(seed)
    facts = facts or FACTS
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(2, 4)):
            _, _, answer = rng.choice(facts)
            first = answer[0]
            if rng.random() < 0.3:
                first = f"{rng.choice(OPENERS)} {_lower_first(first)}"
            parts.append(first)
            if rng.random() < 0.7:
                parts.append(f"{rng.choice(CONNECTORS)} {_lower_first(answer[1])}" if rng.random() < 0.3 else answer[1])
            if rng.random() < 0.4:
                parts.append(rng.choice(NARRATIVE))
        docs.append(" ".join(parts) + EOS)
    return docs


def chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def teacher_documents(seed: int = 1, n: int = 700, facts: list[tuple[str, str, list[str]]] | None = None) -> list[str]:
    """ChatML question/answer conversations; assistant turns end with <|im_end|> then EOS."""
    rng = random.Random(seed)
    facts = facts or FACTS
    docs = []
    for _ in range(n):
        subject, question, answer = rng.choice(facts)
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        q = question if rng.random() < 0.7 else f"Tell me about {subject}."
        messages.append({"role": "user", "content": q})
        reply = " ".join(answer) if rng.random() < 0.8 else answer[0]
        text = chat(messages, add_generation_prompt=True) + reply + "<|im_end|>\n" + EOS
        docs.append(text)
    return docs
