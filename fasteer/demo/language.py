"""The demo world's language: a small word-level grammar with a sentiment attribute.

Why a synthetic language: nothing can be downloaded here, yet a user's first run must show
steering *measurably* working. With a language we wrote, both things steering is judged on
have exact answers:

* **attribute** -- every sentiment-bearing word (adjectives, verbs like "loved"/"hated",
  sentence adverbs like "luckily"/"sadly", "recommend"/"avoid") is in a lexicon with a
  polarity, so :func:`attribute_score` is the fraction of positive words among them;
* **fluency** -- the grammar is a context-free grammar, so :func:`is_grammatical` runs a real
  recognizer: a text either parses or it does not (topic agreement included: "the soup was
  tasty" parses, "the weather was tasty" does not).

Texts are a few sentences on one topic (food, weather, media, places, people). A text opens
with zero to two *neutral* sentences ("anna ate the soup at the cafe .") and goes on with one
to three sentiment sentences that all share one polarity, drawn 50/50 and independent of
the neutral part. So after a neutral prompt the continuation's polarity is a fair coin the
model has to decide -- exactly what a steering vector should tip -- and once the first
sentiment word is out, the rest of the text follows it.

Words are lower case, separated by single spaces; "." and "," are words of their own.
The generator uses ``random.Random`` (stable across Python versions and platforms), so a
seed fixes a corpus everywhere.
"""
from __future__ import annotations

import random
import re
from typing import Iterable, Sequence

# --------------------------------------------------------------------------------------
# Lexicon
# --------------------------------------------------------------------------------------

TOPICS = ("food", "weather", "media", "place", "person")

NOUNS = {
    "food": ("soup", "pizza", "bread", "pasta", "salad", "cake", "coffee", "tea", "curry",
             "burger", "pie", "steak", "rice", "sandwich", "dessert", "breakfast", "lunch",
             "dinner", "meal", "cheese"),
    "weather": ("weather", "sky", "morning", "afternoon", "evening", "day", "weekend",
                "holiday"),
    "media": ("movie", "film", "show", "play", "concert", "musical", "opera", "comedy",
              "documentary", "series", "match", "game", "performance", "festival",
              "lecture", "exhibition"),
    "place": ("park", "beach", "city", "hotel", "museum", "village", "market", "station",
              "cafe", "garden", "restaurant", "library", "zoo", "lake", "island", "town",
              "street", "mall", "harbor", "castle"),
    "person": ("teacher", "neighbor", "doctor", "waiter", "driver", "coach", "guide", "nurse",
               "chef", "manager", "landlord", "mechanic", "pilot", "dentist", "baker",
               "barber", "host", "clerk", "tutor", "captain"),
}
# Weather nouns one can "spend" (neutral weather sentences: "we spent the morning outside").
TIME_NOUNS = ("morning", "afternoon", "evening", "day", "weekend", "holiday")

GENERAL_ADJECTIVES = {
    "pos": ("good", "great", "wonderful", "lovely", "excellent", "pleasant", "amazing",
            "fantastic", "superb", "perfect"),
    "neg": ("bad", "awful", "terrible", "horrible", "poor", "dreadful", "unpleasant",
            "disappointing", "mediocre", "miserable"),
}
TOPIC_ADJECTIVES = {
    "food": {"pos": ("tasty", "delicious", "fresh", "flavorful", "juicy", "crispy"),
             "neg": ("bland", "stale", "greasy", "soggy", "salty", "burnt")},
    "weather": {"pos": ("sunny", "warm", "bright", "mild", "clear", "calm"),
                "neg": ("gloomy", "cold", "stormy", "rainy", "grey", "foggy")},
    "media": {"pos": ("funny", "moving", "clever", "thrilling", "gripping", "brilliant"),
              "neg": ("boring", "dull", "silly", "tedious", "predictable", "shallow")},
    "place": {"pos": ("clean", "beautiful", "quiet", "peaceful", "cozy", "spacious"),
              "neg": ("dirty", "ugly", "noisy", "crowded", "shabby", "cramped")},
    "person": {"pos": ("kind", "friendly", "helpful", "patient", "polite", "cheerful"),
               "neg": ("rude", "lazy", "grumpy", "careless", "impatient", "arrogant")},
}
SENTIMENT_VERBS = {
    "pos": ("loved", "enjoyed", "liked", "adored", "admired", "praised", "appreciated"),
    "neg": ("hated", "disliked", "despised", "loathed", "detested", "criticized", "resented"),
}
SENTENCE_ADVERBS = {
    "pos": ("luckily", "thankfully", "happily", "fortunately"),
    "neg": ("sadly", "unfortunately", "regrettably", "unluckily"),
}
RECOMMEND_VERBS = {"pos": ("recommend",), "neg": ("avoid",)}

INTENSIFIERS = ("very", "really", "quite", "so", "rather", "truly", "incredibly", "fairly",
                "pretty", "extremely")
NAMES = ("anna", "ben", "carla", "david", "emma", "felix", "grace", "henry", "iris", "jack",
         "kate", "leo", "maria", "nina", "oscar", "paul", "rosa", "sam", "tara", "victor")
PRONOUNS = ("we", "i", "they", "she", "he")
POSSESSIVES = ("my", "our", "his", "her", "their")
RELATIVES = ("friend", "sister", "brother", "mother", "father", "uncle", "aunt", "cousin",
             "boss", "roommate", "partner", "son", "daughter")
SAY_VERBS = ("said", "thought", "felt")
NEUTRAL_VERBS = {
    "food": ("ate", "ordered", "tried", "cooked", "shared", "made", "bought"),
    "weather": ("spent",),
    "media": ("watched", "saw", "attended"),
    "place": ("visited", "toured", "explored", "found"),
    "person": ("met", "called", "visited", "saw"),
}
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
PARTS_OF_DAY = ("morning", "afternoon", "evening")
TIME_UNITS = ("week", "night", "month", "year", "weekend")
LOCATION_PREPOSITIONS = ("at", "in", "near")


def _polar_words(polarity: str) -> frozenset[str]:
    words = set(GENERAL_ADJECTIVES[polarity]) | set(SENTIMENT_VERBS[polarity])
    words |= set(SENTENCE_ADVERBS[polarity]) | set(RECOMMEND_VERBS[polarity])
    for topic in TOPICS:
        words |= set(TOPIC_ADJECTIVES[topic][polarity])
    return frozenset(words)


POSITIVE_WORDS = _polar_words("pos")
NEGATIVE_WORDS = _polar_words("neg")

# --------------------------------------------------------------------------------------
# Grammar: nonterminal -> productions. A symbol is a nonterminal (a key of RULES), a word
# class (a key of CLASSES: one word out of a set) or a literal word. Polarity is not part
# of the syntax -- "the soup was tasty and bland ." is grammatical, just mixed in sentiment.
# --------------------------------------------------------------------------------------

CLASSES: dict[str, frozenset[str]] = {
    "NAME": frozenset(NAMES), "PRON": frozenset(PRONOUNS), "POSS": frozenset(POSSESSIVES),
    "REL": frozenset(RELATIVES), "INT": frozenset(INTENSIFIERS),
    "SADV": frozenset(SENTENCE_ADVERBS["pos"] + SENTENCE_ADVERBS["neg"]),
    "SVERB": frozenset(SENTIMENT_VERBS["pos"] + SENTIMENT_VERBS["neg"]),
    "RECV": frozenset(RECOMMEND_VERBS["pos"] + RECOMMEND_VERBS["neg"]),
    "SAYV": frozenset(SAY_VERBS), "DAY": frozenset(DAYS), "PART": frozenset(PARTS_OF_DAY),
    "TUNIT": frozenset(TIME_UNITS), "LPREP": frozenset(LOCATION_PREPOSITIONS),
    "PRO3": frozenset(("it", "he", "she")), "N_time": frozenset(TIME_NOUNS),
}
for _t in TOPICS:
    CLASSES[f"N_{_t}"] = frozenset(NOUNS[_t])
    CLASSES[f"ADJ_{_t}"] = frozenset(
        GENERAL_ADJECTIVES["pos"] + GENERAL_ADJECTIVES["neg"]
        + TOPIC_ADJECTIVES[_t]["pos"] + TOPIC_ADJECTIVES[_t]["neg"])
    CLASSES[f"NV_{_t}"] = frozenset(NEUTRAL_VERBS[_t])


def _build_rules() -> dict[str, list[tuple[str, ...]]]:
    rules: dict[str, list[tuple[str, ...]]] = {
        "TEXT": [("SENT",), ("SENT", "TEXT")],
        "SENT": [],
        "SUBJ": [("NAME",), ("PRON",), ("POSS", "REL")],
        "TIME": [("yesterday",), ("today",), ("tonight",), ("last", "TUNIT"),
                 ("this", "TUNIT"), ("on", "DAY"), ("in", "the", "PART")],
        "LOC": [("LPREP", "the", "N_place")],
        "COMP": [("with", "NAME"), ("with", "POSS", "REL")],
        "MOD": [("LOC",), ("COMP",), ("TIME",)],
        "MODS": [("MOD",), ("MOD", "MODS")],
        "WLOC": [("outside",), ("LOC",)],
    }
    for t in TOPICS:
        np, ap = f"NP_{t}", f"AP_{t}"
        rules[np] = [("the", f"N_{t}")]
        rules[ap] = [(f"ADJ_{t}",), ("INT", f"ADJ_{t}")]
        rules["SENT"] += [
            # sentiment sentences
            (np, "was", ap, "."),
            (np, "was", ap, "and", ap, "."),
            ("SADV", ",", np, "was", ap, "."),
            ("SUBJ", "SVERB", np, "."),
            ("SUBJ", "SVERB", np, "because", "PRO3", "was", ap, "."),
            ("SUBJ", "SAYV", np, "was", ap, "."),
            ("SUBJ", "would", "RECV", np, "."),
        ]
        if t == "weather":
            # neutral: "we spent the morning outside ." / "... at the beach on sunday ."
            rules["SENT"] += [("SUBJ", "spent", "the", "N_time", "WLOC", "."),
                              ("SUBJ", "spent", "the", "N_time", "WLOC", "MODS", ".")]
        else:
            rules["SENT"] += [("SUBJ", f"NV_{t}", np, "."),
                              ("SUBJ", f"NV_{t}", np, "MODS", "."),
                              ("TIME", ",", "SUBJ", f"NV_{t}", np, ".")]
    return rules


RULES = _build_rules()
START = "TEXT"


def _literals() -> frozenset[str]:
    out = set()
    for productions in RULES.values():
        for production in productions:
            out |= {s for s in production if s not in RULES and s not in CLASSES}
    return frozenset(out)


LITERALS = _literals()
VOCABULARY: tuple[str, ...] = tuple(sorted(LITERALS.union(*CLASSES.values())))
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")

# --------------------------------------------------------------------------------------
# Checker
# --------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[^\s.,]+|[.,]")


def words(text: str) -> list[str]:
    """Split a text into the language's words ("soup." -> "soup", ".")."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    return _WORD_RE.findall(text)


def attribute_score(text: str, default: float | None = None) -> float | None:
    """Fraction of positive words among the text's sentiment words, in [0, 1].

    Returns ``default`` (None unless given, e.g. 0.5) when the text has no sentiment word.
    """
    pos = neg = 0
    for w in words(text):
        pos += w in POSITIVE_WORDS
        neg += w in NEGATIVE_WORDS
    if pos + neg == 0:
        return default
    return pos / (pos + neg)


class _Recognizer:
    """Set-valued recursive descent: ``ends(symbol, i)`` is every position where a phrase of
    ``symbol`` starting at ``i`` can end. Memoized per (symbol, i), it explores all parses of
    this (non-left-recursive) grammar in polynomial time -- a complete CFG recognizer.

    In prefix mode running out of input counts as success for any symbol, so the text is
    accepted iff some grammatical text starts with it (every symbol derives a non-empty
    string, so the remainder can always be completed).
    """

    def __init__(self, tokens: Sequence[str], prefix: bool):
        self.tokens = tokens
        self.n = len(tokens)
        self.prefix = prefix
        self.memo: dict[tuple[str, int], frozenset[int]] = {}

    def ends(self, symbol: str, i: int) -> frozenset[int]:
        if i == self.n:
            return frozenset((i,)) if self.prefix else frozenset()
        if symbol in CLASSES:
            return frozenset((i + 1,)) if self.tokens[i] in CLASSES[symbol] else frozenset()
        if symbol not in RULES:
            return frozenset((i + 1,)) if self.tokens[i] == symbol else frozenset()
        key = (symbol, i)
        if key not in self.memo:
            out: set[int] = set()
            for production in RULES[symbol]:
                positions = {i}
                for s in production:
                    positions = set().union(*(self.ends(s, p) for p in positions))
                    if not positions:
                        break
                out |= positions
            self.memo[key] = frozenset(out)
        return self.memo[key]


def is_grammatical(text: str, prefix: bool = False) -> bool:
    """Does ``text`` parse as a whole text of the language (at least one full sentence)?

    With ``prefix=True``: can the text be continued into a grammatical one (useful for
    generations cut off by a token limit)? The empty text is a prefix, not a text.
    """
    if not isinstance(prefix, bool):
        raise TypeError(f"prefix: expected a bool, got {type(prefix).__name__}")
    tokens = words(text)
    if not tokens:
        return prefix
    return len(tokens) in _Recognizer(tokens, prefix).ends(START, 0)


def score_texts(texts: Iterable[str]) -> dict[str, float | int]:
    """Aggregate checker numbers over texts.

    ``attribute``: mean attribute score over texts that have a sentiment word (0.5 when none
    has); ``grammaticality``: fraction of texts that parse; ``scored``: how many texts had a
    sentiment word; ``n``: number of texts.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("texts: expected at least one text, got none")
    scores = [s for s in (attribute_score(t) for t in texts) if s is not None]
    return {
        "attribute": sum(scores) / len(scores) if scores else 0.5,
        "grammaticality": sum(is_grammatical(t) for t in texts) / len(texts),
        "scored": len(scores),
        "n": len(texts),
    }


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------

def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected a count >= 0, got {value}")
    return value


def _check_polarity(polarity):
    if polarity not in (None, "pos", "neg"):
        raise ValueError(f"polarity: expected 'pos', 'neg' or None, got {polarity!r}")
    return polarity


class _Writer:
    """Draws sentences for one text: one topic and one main noun, one polarity."""

    def __init__(self, rng: random.Random, polarity: str, topic: str | None = None):
        self.rng = rng
        self.polarity = polarity
        self.topic = topic or rng.choice(TOPICS)
        self.noun = rng.choice(TIME_NOUNS if self.topic == "weather" else NOUNS[self.topic])

    # -- phrases --
    def subject(self) -> list[str]:
        r = self.rng.random()
        if r < 0.4:
            return [self.rng.choice(NAMES)]
        if r < 0.7:
            return [self.rng.choice(PRONOUNS)]
        return [self.rng.choice(POSSESSIVES), self.rng.choice(RELATIVES)]

    def time(self) -> list[str]:
        kind = self.rng.randrange(5)
        if kind == 0:
            return [self.rng.choice(("yesterday", "today", "tonight"))]
        if kind == 1:
            return [self.rng.choice(("last", "this")), self.rng.choice(TIME_UNITS)]
        if kind == 2:
            return ["on", self.rng.choice(DAYS)]
        return ["in", "the", self.rng.choice(PARTS_OF_DAY)]

    def location(self) -> list[str]:
        return [self.rng.choice(LOCATION_PREPOSITIONS), "the", self.rng.choice(NOUNS["place"])]

    def company(self) -> list[str]:
        if self.rng.random() < 0.5:
            return ["with", self.rng.choice(NAMES)]
        return ["with", self.rng.choice(POSSESSIVES), self.rng.choice(RELATIVES)]

    def modifiers(self) -> list[str]:
        makers = [self.location, self.company, self.time]
        self.rng.shuffle(makers)
        out: list[str] = []
        for make in makers[: self.rng.choice((1, 1, 2))]:
            out += make()
        return out

    def adjective_phrase(self) -> list[str]:
        pool = TOPIC_ADJECTIVES[self.topic][self.polarity]
        if self.rng.random() < 0.3:
            pool = GENERAL_ADJECTIVES[self.polarity]
        out = [self.rng.choice(pool)]
        if self.rng.random() < 0.4:
            out.insert(0, self.rng.choice(INTENSIFIERS))
        return out

    def referent(self) -> list[str]:
        """The main noun again, or (sometimes) another noun of the same topic."""
        if self.rng.random() < 0.75:
            return ["the", self.noun]
        return ["the", self.rng.choice(NOUNS[self.topic])]

    # -- sentences --
    def neutral(self) -> list[str]:
        if self.topic == "weather":
            where = ["outside"] if self.rng.random() < 0.4 else self.location()
            out = self.subject() + ["spent", "the", self.noun] + where
            if self.rng.random() < 0.4:
                out += self.time()
            return out + ["."]
        verb = self.rng.choice(NEUTRAL_VERBS[self.topic])
        core = self.subject() + [verb, "the", self.noun]
        r = self.rng.random()
        if r < 0.3:
            return core + ["."]
        if r < 0.75:
            return core + self.modifiers() + ["."]
        return self.time() + [","] + core + ["."]

    def sentiment(self) -> list[str]:
        p = self.polarity
        kind = self.rng.randrange(7)
        if kind == 0:
            return self.referent() + ["was"] + self.adjective_phrase() + ["."]
        if kind == 1:
            return (self.referent() + ["was"] + self.adjective_phrase() + ["and"]
                    + self.adjective_phrase() + ["."])
        if kind == 2:
            return ([self.rng.choice(SENTENCE_ADVERBS[p]), ","] + self.referent() + ["was"]
                    + self.adjective_phrase() + ["."])
        if kind == 3:
            return self.subject() + [self.rng.choice(SENTIMENT_VERBS[p])] + self.referent() + ["."]
        if kind == 4:
            pronoun = self.rng.choice(("he", "she")) if self.topic == "person" else "it"
            return (self.subject() + [self.rng.choice(SENTIMENT_VERBS[p])] + self.referent()
                    + ["because", pronoun, "was"] + self.adjective_phrase() + ["."])
        if kind == 5:
            return (self.subject() + [self.rng.choice(SAY_VERBS)] + self.referent() + ["was"]
                    + self.adjective_phrase() + ["."])
        return self.subject() + ["would", RECOMMEND_VERBS[p][0]] + self.referent() + ["."]


def _neutral_count(rng: random.Random) -> int:
    r = rng.random()
    return 0 if r < 0.1 else (1 if r < 0.75 else 2)


def generate_text(rng: random.Random, polarity: str | None = None) -> str:
    """One text: 0-2 neutral sentences, then 1-3 sentiment sentences of one polarity
    (drawn 50/50 when ``polarity`` is None, independent of the neutral part)."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng: expected a random.Random, got {type(rng).__name__}")
    polarity = _check_polarity(polarity)
    # The neutral part is drawn before the polarity, so it cannot depend on it.
    writer = _Writer(rng, "pos")
    sentences = [writer.neutral() for _ in range(_neutral_count(rng))]
    writer.polarity = polarity or rng.choice(("pos", "neg"))
    sentences += [writer.sentiment() for _ in range(rng.choice((1, 2, 2, 3)))]
    return " ".join(w for s in sentences for w in s)


def generate_corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` texts, fixed by ``seed``; positive and negative texts about 50/50."""
    _check_count("n", n)
    rng = random.Random(seed)
    return [generate_text(rng) for _ in range(n)]


def neutral_prompts(n: int, seed: int = 1) -> list[str]:
    """``n`` prompts with no sentiment word whose continuation may go either way.

    Most are one or two neutral sentences; about a quarter stop inside the next sentence
    right before the sentiment word ("... . the soup was").
    """
    _check_count("n", n)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        writer = _Writer(rng, "pos")
        sentences = [writer.neutral() for _ in range(rng.choice((1, 1, 2)))]
        tokens = [w for s in sentences for w in s]
        if rng.random() < 0.25:
            tokens += ["the", writer.noun, "was"]
        out.append(" ".join(tokens))
    return out


def _flip(word: str) -> str:
    """The word at the same place in the opposite polarity's list (tasty <-> bland)."""
    groups = [GENERAL_ADJECTIVES, SENTIMENT_VERBS, SENTENCE_ADVERBS, RECOMMEND_VERBS]
    groups += [TOPIC_ADJECTIVES[t] for t in TOPICS]
    for group in groups:
        for p, q in (("pos", "neg"), ("neg", "pos")):
            if word in group[p]:
                return group[q][group[p].index(word)]
    return word


def contrastive_pairs(n: int, seed: int = 2) -> list[tuple[str, str]]:
    """``n`` (positive, negative) texts for CAA: the same neutral opening and the same
    sentiment sentence, differing only in the polarity of every sentiment word.
    Both end with "." so the last token's residual carries the text's polarity forward."""
    _check_count("n", n)
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        writer = _Writer(rng, "pos")
        opening = [w for _ in range(rng.choice((0, 1, 1))) for w in writer.neutral()]
        positive = opening + writer.sentiment()
        negative = [_flip(w) for w in positive]
        pairs.append((" ".join(positive), " ".join(negative)))
    return pairs
