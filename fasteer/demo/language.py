"""The demo world's language: a small word-level grammar with a sentiment attribute.

Why a synthetic language: nothing can be downloaded here, yet a user's first run must show
steering *measurably* working. With a language we wrote, both things steering is judged on
have exact answers:

* **attribute** -- every sentiment-bearing word (adjectives, verbs like "loved"/"hated",
  adverbs like "luckily"/"sadly" and "gladly"/"reluctantly", "recommend"/"avoid") is in a
  lexicon with a polarity, so :func:`attribute_score` is the share of positive words among
  them;
* **fluency** -- the grammar is a context-free grammar and :func:`is_grammatical` runs a
  real recognizer over it: a text parses or it does not.

Texts are a few sentences on one topic (food, weather, media, places, people), ~300 words
in all. A text opens with zero to two *neutral* sentences ("anna ate the soup at the cafe
."), then has a sentiment sentence and often one more sentence; every sentiment word of a
text has one polarity, drawn 50/50 independently of the neutral opening. So after a
neutral prompt the polarity of the continuation is a fair coin the model has to toss --
exactly what a steering vector should tip -- and once the first sentiment word is out, the
rest of the text follows it.

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
MANNER_ADVERBS = {
    "pos": ("gladly", "eagerly", "cheerfully", "proudly"),
    "neg": ("reluctantly", "grudgingly", "angrily", "wearily"),
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
    words |= set(SENTENCE_ADVERBS[polarity]) | set(MANNER_ADVERBS[polarity])
    words |= set(RECOMMEND_VERBS[polarity])
    for topic in TOPICS:
        words |= set(TOPIC_ADJECTIVES[topic][polarity])
    return frozenset(words)


POSITIVE_WORDS = _polar_words("pos")
NEGATIVE_WORDS = _polar_words("neg")

# --------------------------------------------------------------------------------------
# Grammar: nonterminal -> productions. A symbol is a nonterminal (a key of RULES), a word
# class (a key of CLASSES: one word out of a set) or a literal word. The grammar is about
# syntax only: neither polarity nor topic is part of it -- "the soup was tasty and bland ."
# and "our weather was tasty ." are grammatical (mixed, odd); "the tasty was soup .",
# "the anna ate ." and "the soup was very very good ." are not. It accepts more than the
# generator writes (any determiner, names as objects), so that it judges syntax, not style.
# --------------------------------------------------------------------------------------

CLASSES: dict[str, frozenset[str]] = {
    "NAME": frozenset(NAMES), "PRON": frozenset(PRONOUNS + ("it",)),
    "POSS": frozenset(POSSESSIVES), "INT": frozenset(INTENSIFIERS),
    "N": frozenset(RELATIVES + tuple(n for t in TOPICS for n in NOUNS[t])),
    "ADJ": frozenset(w for p in ("pos", "neg") for w in GENERAL_ADJECTIVES[p]
                     + tuple(a for t in TOPICS for a in TOPIC_ADJECTIVES[t][p])),
    "SADV": frozenset(SENTENCE_ADVERBS["pos"] + SENTENCE_ADVERBS["neg"]),
    "MADV": frozenset(MANNER_ADVERBS["pos"] + MANNER_ADVERBS["neg"]),
    "SVERB": frozenset(SENTIMENT_VERBS["pos"] + SENTIMENT_VERBS["neg"]),
    "NVERB": frozenset(v for t in TOPICS for v in NEUTRAL_VERBS[t]),
    "RECV": frozenset(RECOMMEND_VERBS["pos"] + RECOMMEND_VERBS["neg"]),
    "SAYV": frozenset(SAY_VERBS), "DAY": frozenset(DAYS), "PART": frozenset(PARTS_OF_DAY),
    "TUNIT": frozenset(TIME_UNITS), "LPREP": frozenset(LOCATION_PREPOSITIONS),
}

# One or more of a symbol, kept apart from RULES so the recognizer loops instead of
# recursing (a long text must not hit Python's recursion limit).
REPEATS: dict[str, str] = {"TEXT": "SENT", "MODS": "MOD"}

RULES: dict[str, list[tuple[str, ...]]] = {
    "SENT": [("CLAUSE", "."), ("SADV", ",", "CLAUSE", "."), ("TIME", ",", "CLAUSE", ".")],
    "CLAUSE": [("SUBJ", "was", "AP"),
               ("SUBJ", "PRED"),
               ("SUBJ", "MADV", "PRED"),
               ("SUBJ", "SAYV", "SUBJ", "was", "AP"),
               ("SUBJ", "would", "RECV", "OBJ")],
    "PRED": [("VERB", "OBJ"), ("VERB", "OBJ", "MODS"),
             ("VERB", "OBJ", "because", "SUBJ", "was", "AP")],
    "VERB": [("SVERB",), ("NVERB",)],
    "SUBJ": [("NAME",), ("PRON",), ("NP",)],
    "OBJ": [("NAME",), ("NP",)],
    "NP": [("DET", "NOM")],
    "DET": [("the",), ("POSS",)],
    "NOM": [("N",), ("ADJ", "N"), ("INT", "ADJ", "N")],
    "AP": [("AP1",), ("AP1", "and", "AP1")],
    "AP1": [("ADJ",), ("INT", "ADJ")],
    "MOD": [("LPREP", "NP"), ("with", "OBJ"), ("TIME",), ("outside",)],
    "TIME": [("yesterday",), ("today",), ("tonight",), ("last", "TUNIT"), ("this", "TUNIT"),
             ("on", "DAY"), ("in", "the", "PART")],
}
START = "TEXT"


def _literals() -> frozenset[str]:
    out = set()
    for productions in RULES.values():
        for production in productions:
            out |= {s for s in production
                    if s not in RULES and s not in CLASSES and s not in REPEATS}
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
        if symbol not in RULES and symbol not in REPEATS:
            return frozenset((i + 1,)) if self.tokens[i] == symbol else frozenset()
        key = (symbol, i)
        if key in self.memo:
            return self.memo[key]
        out: set[int] = set()
        if symbol in REPEATS:  # one or more: grow the set of reachable ends to a fixpoint
            frontier = {i}
            while frontier:
                reached = set().union(*(self.ends(REPEATS[symbol], p) for p in frontier))
                frontier = reached - out
                out |= reached
        else:
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
    """Draws sentences for one text: one topic, one main noun, one polarity.

    Sentiment sentences put sentiment words in many slots -- after "was", before nouns
    ("the tasty soup"), before verbs ("anna gladly ate"), at the start ("luckily , ...").
    So almost everywhere in a text the next word may carry polarity, and the model has to
    keep the text's polarity at hand at every position: a persistent direction in the
    residual stream, which is what an added steering vector then imitates.
    """

    def __init__(self, rng: random.Random, polarity: str, topic: str | None = None):
        self.rng = rng
        self.polarity = polarity
        self.topic = topic or rng.choice(TOPICS)
        self.noun = rng.choice(TIME_NOUNS if self.topic == "weather" else NOUNS[self.topic])

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

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
        if self.chance(0.5):
            return ["with", self.rng.choice(NAMES)]
        return ["with", self.rng.choice(POSSESSIVES), self.rng.choice(RELATIVES)]

    def modifiers(self) -> list[str]:
        makers = [self.location, self.company, self.time]
        self.rng.shuffle(makers)
        out: list[str] = []
        for make in makers[: self.rng.choice((1, 1, 2))]:
            out += make()
        return out

    def adjective(self) -> list[str]:
        pool = TOPIC_ADJECTIVES[self.topic][self.polarity]
        if self.chance(0.3):
            pool = GENERAL_ADJECTIVES[self.polarity]
        out = [self.rng.choice(pool)]
        if self.chance(0.3):
            out.insert(0, self.rng.choice(INTENSIFIERS))
        return out

    def adjective_phrase(self) -> list[str]:
        first = self.adjective()
        if self.chance(0.3):
            second = self.adjective()
            while second[-1] == first[-1]:  # "tasty and tasty" would teach copying words
                second = self.adjective()
            return first + ["and"] + second
        return first

    def referent(self, attributive: float = 0.0) -> list[str]:
        """The main noun again (sometimes another of the topic), maybe with an adjective."""
        noun = self.noun if self.chance(0.75) else self.rng.choice(NOUNS[self.topic])
        if self.chance(attributive):
            return ["the"] + self.adjective() + [noun]
        return ["the", noun]

    def actor(self, adverb: float) -> list[str]:
        """A subject, maybe with a manner adverb ("anna gladly", "we reluctantly")."""
        out = self.subject()
        if self.chance(adverb):
            out.append(self.rng.choice(MANNER_ADVERBS[self.polarity]))
        return out

    def neutral_verb(self) -> str:
        return self.rng.choice(NEUTRAL_VERBS[self.topic])

    # -- sentences --
    def neutral(self) -> list[str]:
        core = self.subject() + [self.neutral_verb(), "the", self.noun]
        if self.topic == "weather":
            where = ["outside"] if self.chance(0.4) else self.location()
            return core + where + (self.time() if self.chance(0.4) else []) + ["."]
        r = self.rng.random()
        if r < 0.3:
            return core + ["."]
        if r < 0.75:
            return core + self.modifiers() + ["."]
        return self.time() + [","] + core + ["."]

    def sentiment(self) -> list[str]:
        p = self.polarity
        kind = self.rng.randrange(6)
        if kind == 0:
            out = self.referent(0.3) + ["was"] + self.adjective_phrase()
        elif kind == 1:
            out = self.actor(0.3) + [self.rng.choice(SENTIMENT_VERBS[p])] + self.referent(0.3)
        elif kind == 2:
            pronoun = self.rng.choice(("he", "she")) if self.topic == "person" else "it"
            out = (self.actor(0.3) + [self.rng.choice(SENTIMENT_VERBS[p])] + self.referent(0.3)
                   + ["because", pronoun, "was"] + self.adjective_phrase())
        elif kind == 3:
            out = (self.subject() + [self.rng.choice(SAY_VERBS)] + self.referent(0.3) + ["was"]
                   + self.adjective_phrase())
        elif kind == 4:
            out = self.subject() + ["would", RECOMMEND_VERBS[p][0]] + self.referent(0.3)
        else:  # a neutral verb, the sentiment in the adverb and the adjective
            out = self.actor(0.5) + [self.neutral_verb()] + self.referent(1.0)
            if self.topic == "weather":
                out += ["outside"] if self.chance(0.5) else self.location()
            elif self.chance(0.4):
                out += self.modifiers()
        if self.chance(0.2):
            out = [self.rng.choice(SENTENCE_ADVERBS[p]), ","] + out
        return out + ["."]


def _neutral_count(rng: random.Random) -> int:
    r = rng.random()
    return 0 if r < 0.1 else (1 if r < 0.75 else 2)


def generate_text(rng: random.Random, polarity: str | None = None) -> str:
    """One text: 0-2 neutral sentences, a sentiment sentence, then in two texts of three
    one more sentence (mostly sentiment); all sentiment words share one polarity (drawn
    50/50 when ``polarity`` is None, independent of the neutral opening)."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng: expected a random.Random, got {type(rng).__name__}")
    polarity = _check_polarity(polarity)
    # The neutral part is drawn before the polarity, so it cannot depend on it.
    writer = _Writer(rng, "pos")
    sentences = [writer.neutral() for _ in range(_neutral_count(rng))]
    writer.polarity = polarity or rng.choice(("pos", "neg"))
    sentences.append(writer.sentiment())
    for _ in range(rng.choice((0, 1, 1))):
        # Neutral sentences also follow sentiment ones, so the model meets plain syntax
        # with a polarity already in the air -- the state a steering vector puts there.
        sentences.append(writer.neutral() if rng.random() < 0.3 else writer.sentiment())
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


def flip_polarity(word: str) -> str:
    """The word at the same place in the opposite polarity's list (tasty <-> bland);
    words without a polarity come back unchanged."""
    groups = [GENERAL_ADJECTIVES, SENTIMENT_VERBS, SENTENCE_ADVERBS, MANNER_ADVERBS,
              RECOMMEND_VERBS]
    groups += [TOPIC_ADJECTIVES[t] for t in TOPICS]
    for group in groups:
        for p, q in (("pos", "neg"), ("neg", "pos")):
            if word in group[p]:
                return group[q][group[p].index(word)]
    return word


def contrastive_pairs(n: int, seed: int = 2) -> list[tuple[str, str]]:
    """``n`` (positive, negative) prompts for CAA (difference of means at the last token).

    Each pair is one text and its mirror -- every sentiment word swapped for its opposite
    (tasty <-> bland, loved <-> hated), nothing else changed -- cut at a random word after
    the first sentiment word that is not itself a sentiment word. So the last token is the
    same word in both prompts and only the polarity in the air differs; and the cut lands on
    every kind of position (".", "the", "was", a name, a noun), so the mean difference is
    the polarity state as the model keeps it everywhere -- which is what a vector added at
    every position has to imitate.
    """
    _check_count("n", n)
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        writer = _Writer(rng, rng.choice(("pos", "neg")))
        opening = [w for _ in range(rng.choice((0, 1, 1))) for w in writer.neutral()]
        writer.polarity = "pos"
        text = opening + writer.sentiment()
        text += writer.sentiment() if rng.random() < 0.5 else writer.neutral()
        first = next(i for i, w in enumerate(text) if w in POSITIVE_WORDS)
        cut = rng.choice([i for i in range(first + 1, len(text)) if text[i] not in POSITIVE_WORDS])
        positive = text[:cut + 1]
        pairs.append((" ".join(positive), " ".join(flip_polarity(w) for w in positive)))
    return pairs


def instruction_pairs(n: int, seed: int = 5) -> list[tuple[str, str]]:
    """``n`` (with instruction, without) inputs for instruction vectors (Stolfo et al.).

    The language has no imperative, so the "instruction" is what sets a text's attitude:
    an opening of two positive sentiment sentences. Each pair is the same neutral prompt
    (:func:`neutral_prompts`, whose continuation is a fair coin) after that opening, and
    after its mirror (every sentiment word flipped). The partner keeps an opening of the
    same words so that the pair differs in the instruction's content alone: measured by
    ``scripts/study_demo_vectors.py``, the direction from these pairs has cosine 0.94 with
    the CAA one, while "opening vs. no opening" gives a direction with cosine 0.30 --
    mostly the extra context and positions -- whose Clamp steers only by pinning a larger
    target along it. The last token is the prompt's own, where the model must carry the
    attitude across a neutral stretch -- the state the Clamp target ``c`` then pins.
    """
    _check_count("n", n)
    rng = random.Random(seed)
    prompts = neutral_prompts(n, seed=seed + 100)
    pairs = []
    for prompt in prompts:
        writer = _Writer(rng, "pos")
        opening = writer.sentiment() + writer.sentiment()
        pairs.append((" ".join(opening) + " " + prompt,
                      " ".join(flip_polarity(w) for w in opening) + " " + prompt))
    return pairs
