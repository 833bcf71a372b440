"""Builds kangaroo_ext/data/long_context_dev.jsonl: the long-context development set of issue 22.

Sources (public domain: works of the US Government): the inaugural addresses and State of the Union
addresses that NLTK ships as the corpora `inaugural` and `state_union` (nltk/nltk_data,
packages/corpora/{inaugural,state_union}.zip, marked "public domain"). Unzip both into one folder and run

    python scripts/make_long_context_dev.py FOLDER

Two categories, as in Spec-Bench's jsonl format (question_id, category, turns):
  summarization  one address (whole, or its leading paragraphs up to SUMMARY_TOKENS) and an instruction
                 to summarize it, worded by us;
  rag            four passages from four different State of the Union addresses (one holds the answer),
                 then a question written by us from the passage that holds it.
Token counts use the default model's tokenizer (SmolLM2), so every prompt lands in ~800-2,000 tokens.
"""
import json
import os
import random
import sys

SUMMARY_TOKENS = 1750        # the most tokens of speech text in a summarization prompt
PASSAGE_TOKENS = (280, 450)  # a rag passage: whole paragraphs, at least / at most this many tokens

# (address, instruction): our wording, varied so the set does not reward one phrasing.
SUMMARIES = [
    ("1789-Washington", "Summarize the address above in one paragraph: what does the new President say about his "
                        "own feelings on taking office, and what does he ask of Congress?"),
    ("1809-Madison", "Write a short summary of this inaugural address, listing the principles Madison promises "
                     "to follow in office."),
    ("1829-Jackson", "Summarize the main points of President Jackson's address above in five bullet points."),
    ("1849-Taylor", "In a few sentences, summarize what President Taylor says about the duties of his office and "
                    "the policies he intends to pursue."),
    ("1869-Grant", "Give a concise summary of this address, covering what Grant says about the public debt, "
                   "the currency and the treatment of the Indians."),
    ("1873-Grant", "Summarize the speech above in one paragraph, then name the three issues it stresses most."),
    ("1905-Roosevelt", "Summarize this address in three or four sentences: what responsibilities does Theodore "
                       "Roosevelt say the nation now carries?"),
    ("1917-Wilson", "Write a summary of President Wilson's second inaugural address above, focusing on what he "
                    "says about the war in Europe and America's position."),
    ("1941-Roosevelt", "Summarize the address above: what does Franklin Roosevelt say a nation is, and what does "
                       "he think is at stake in 1941?"),
    ("1961-Kennedy", "Summarize President Kennedy's inaugural address above in one paragraph, mentioning what he "
                     "asks of Americans and of other nations."),
    ("1965-Johnson", "Summarize the main themes of this address in a short paragraph, quoting one phrase from it."),
    ("1977-Carter", "Write a brief summary of President Carter's inaugural address above and the hopes it "
                    "states for the nation."),
]

# (State of the Union address holding the answer, its passage index, question): our wording.
QUESTIONS = [
    ("1947-Truman", 4, "According to the passages above, what five major economic goals did President Truman list, "
                       "and how did he describe relations between labor and management in the year just past?"),
    ("1953-Eisenhower", 7, "According to the passages above, what did President Eisenhower call the one sure way to "
                           "avoid total war, and which two kinds of deterrent against an aggressor did he describe?"),
    ("1962-Kennedy", 0, "Using the passages above, whose death did President Kennedy mention at the start of his "
                        "address, and how did he describe the relationship between the Congress and the President?"),
    ("1964-Johnson", 9, "Based on the passages above, what steps toward the control of arms did President Johnson "
                        "announce, including what he said about enriched uranium and plutonium?"),
    ("1975-Ford", 5, "According to the passages above, what did President Ford say about federal outlays for fiscal "
                     "year 1976, and what did he say about the price of petroleum and America's dependence on "
                     "foreign oil?"),
    ("1979-Carter", 11, "From the passages above: which words did President Carter say the founding generation made "
                        "vivid, and what did he call the duty of his own generation?"),
    ("1984-Reagan", 3, "According to the passages above, what did President Reagan say about the military and the "
                       "'freedom tide', and whom did he quote from fifty years earlier?"),
    ("1990-Bush", 11, "Using only the passages above, which children did President Bush describe meeting in the past "
                      "year, and what did he say all of them have in common?"),
    ("1994-Clinton", 20, "According to the passages above, who is Kevin Jett, and how many more police officers did "
                         "President Clinton ask Congress to provide?"),
    ("1999-Clinton", 11, "Based on the passages above, what health-care measures did President Clinton ask for people "
                         "with disabilities, for working families without insurance, and for mental illness?"),
    ("2002-GWBush", 2, "According to the passages above, what did President Bush say was found in Afghanistan, and "
                       "what did he conclude about the war against terror?"),
    ("2005-GWBush", 2, "From the passages above: what did President Bush propose to prepare a rising generation for "
                       "the jobs of the 21st century, and how many additional workers would get job training?"),
]

# Addresses the rag distractors are drawn from (never the one that holds the answer).
DISTRACTOR_ADDRESSES = ["1947-Truman", "1953-Eisenhower", "1958-Eisenhower", "1962-Kennedy", "1964-Johnson",
                        "1972-Nixon", "1975-Ford", "1979-Carter", "1984-Reagan", "1986-Reagan", "1990-Bush",
                        "1994-Clinton", "1999-Clinton", "2002-GWBush", "2005-GWBush"]

# The corpus files hold a few Windows-codepage characters read as latin-1.
_MOJIBAKE = {"\u00a1\u00a6": "'", "\u00a1X": "--", "\u0092": "'", "\u0093": '"', "\u0094": '"', "\u0097": "--"}


def read_paragraphs(path: str):
    text = open(path, encoding="latin-1").read()
    for bad, good in _MOJIBAKE.items():
        text = text.replace(bad, good)
    return [line.strip() for line in text.split("\n") if line.strip()]


def leading_paragraphs(paragraphs, count_tokens, budget: int) -> str:
    kept = []
    for p in paragraphs:
        if count_tokens("\n\n".join(kept + [p])) > budget:
            break
        kept.append(p)
    return "\n\n".join(kept)


def passages(paragraphs, count_tokens):
    """Consecutive paragraphs grouped into passages of PASSAGE_TOKENS (a group over the bound is dropped)."""
    lo, hi = PASSAGE_TOKENS
    out, current = [], []
    for p in paragraphs[1:]:  # the first line is the address's title
        current.append(p)
        if count_tokens(" ".join(current)) >= lo:
            if count_tokens("\n".join(current)) <= hi:
                out.append("\n".join(current))
            current = []
    return out


def build(folder: str, count_tokens):
    rng = random.Random(22)
    records = []
    for i, (name, instruction) in enumerate(SUMMARIES):
        text = leading_paragraphs(read_paragraphs(os.path.join(folder, "inaugural", name + ".txt")),
                                  count_tokens, SUMMARY_TOKENS)
        records.append({"question_id": 2201 + i, "category": "summarization",
                        "source": f"US presidential inaugural address {name} (public domain)",
                        "turns": [f"Here is a speech:\n\n{text}\n\n{instruction}"]})
    cache = {}

    def of(name):
        if name not in cache:
            cache[name] = passages(read_paragraphs(os.path.join(folder, "state_union", name + ".txt")), count_tokens)
        return cache[name]

    for i, (name, index, question) in enumerate(QUESTIONS):
        others = rng.sample([d for d in DISTRACTOR_ADDRESSES if d != name], 3)
        chosen = [(name, of(name)[index])] + [(d, rng.choice(of(d))) for d in others]
        rng.shuffle(chosen)
        body = "\n\n".join(f"Passage {k + 1} (State of the Union address, {d.replace('-', ', ')}):\n{p}"
                           for k, (d, p) in enumerate(chosen))
        records.append({"question_id": 2301 + i, "category": "rag",
                        "source": "US State of the Union addresses " + ", ".join(d for d, _ in chosen)
                                  + " (public domain)",
                        "turns": [f"{body}\n\n{question}"]})
    return records


def main(folder: str, out_path: str):
    from kangaroo_ext import load_default_model
    _, tokenizer = load_default_model(device="cpu")

    def count_tokens(text):
        return len(tokenizer(text)["input_ids"])

    records = build(folder, count_tokens)
    with open(out_path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for r in records:
        print(r["question_id"], r["category"], count_tokens(r["turns"][0]), "tokens")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else
         os.path.join(os.path.dirname(__file__), "..", "kangaroo_ext", "data", "long_context_dev.jsonl"))
