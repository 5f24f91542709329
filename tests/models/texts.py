"""Fixed English texts for the end-to-end comparisons (written for these tests)."""

# Ten prompts of different kinds: facts, lists, code, dialogue, narrative.
GREEDY_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Here is a list of the planets of the solar system: Mercury, Venus,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The three primary colors are",
    "To make a cup of tea, first",
    "In 1969, the Apollo 11 mission",
    "Photosynthesis is the process by which",
    "The most important rule of writing clear code is",
)

# About 300 tokens of plain prose; the KL test uses the first 256 tokens.
KL_TEXT = (
    "The lighthouse stood at the end of a narrow spit of rock, and for as long as anyone in "
    "the village could remember, it had been kept by the same family. Every evening, a little "
    "before sunset, the keeper climbed the one hundred and twelve steps of the spiral stair, "
    "trimmed the wick, polished the great lens until it shone, and lit the lamp that warned "
    "ships away from the reef. In winter the storms came in from the west, and the waves broke "
    "so high against the tower that spray rattled on the windows of the lamp room. The keeper's "
    "daughter, who was eleven that year, kept a notebook in which she wrote down the name of "
    "every ship that passed, the direction of the wind, and the height of the tide. Her father "
    "said the notebook was more accurate than the harbour master's ledger, and the harbour "
    "master, when he heard of it, came out in his boat one calm morning to see for himself. He "
    "stayed for tea, read the notebook from the first page to the last, and asked whether she "
    "would be willing to send him a copy of each week's entries. She agreed, on the condition "
    "that he would teach her how to read the charts that hung on the walls of his office. By the "
    "following spring she could name every rock and shoal between the lighthouse and the river "
    "mouth, and she had begun to draw charts of her own, marking the places where the currents "
    "turned and where the seals came ashore to rest in the afternoon sun."
)
