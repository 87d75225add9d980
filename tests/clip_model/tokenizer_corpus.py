"""Deterministic text corpora for the tokenizer tests: hand-picked edge cases plus seeded random mixtures.

Every function returns the same list on every run and platform (``random.Random`` with a fixed seed).
"""

from __future__ import annotations

import random
import string
import unicodedata

DEFAULT_SEED = 20_210_105  # any fixed value; changing it changes the corpus, not what the tests check

WORDS = [
    "a", "photo", "of", "the", "cat", "dog", "sitting", "on", "sofa", "red", "car", "Mountain", "LAKE", "sunset",
    "diagram", "painting", "portrait", "bicycle", "x-ray", "e-mail", "New", "York", "rock'n'roll",
    "supercalifragilistic", "antidisestablishmentarianism", "qwzx", "aaaa", "zzzzzzzz", "McDonald", "iPhone",
    "CamelCaseWord", "snake_case",
]  # fmt: skip
CONTRACTIONS = [
    "it's", "don't", "you're", "they've", "I'm", "we'll", "he'd", "IT'S", "DON'T", "You'Re", "o'clock", "'s", "'t",
    "'re", "'ve", "'m", "'ll", "'d", "rock'n'roll", "'tis", "y'all'd've", "I’m", "don’t", "'ſ", "'Ŀl",
]  # fmt: skip
SCRIPTS = [
    "一只猫坐在沙发上", "猫が好きです", "カタカナ", "고양이가 소파에 앉아 있다", "قطة على الأريكة", "חתול על הספה",
    "सोफे पर बिल्ली", "แมวบนโซฟา", "Σίσυφος ΟΔΥΣΣΕΥΣ", "Кошка на диване", "İstanbul", "STRASSE straße ẞ",
    "Ǆemal ǅ ǆ", "ﬁne ﬂow ﬀ ﬅ", "ŉ", "Ꭰ Ꮳ", "ⓐⓑ Ⓐ", "ꙮ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝓉𝑒𝓍𝓉", "ａｂｃ　ＡＢＣ", "ﾊﾝｶｸ", "ᚠᛇᚻ",
    "Ⲁⲛⲟⲕ", "𐌰𐌱𐌲", "ئۇيغۇرچە", "ᓀᐦᐃᔭᐍᐏᐣ", "ትግርኛ", "ಕನ್ನಡ", "தமிழ்", "বাংলা", "ગુજરાતી", "ລາວ", "ཏིབ",
]  # fmt: skip
ACCENTED = ["café", "naïve", "Zoë", "résumé", "Ångström", "piñata", "São Paulo", "Dvořák", "Łódź", "Ærøskøbing"]
EMOJI = [
    "👍", "👍🏽", "👍🏿", "👨‍👩‍👧‍👦", "👩🏽‍💻", "🏳️‍🌈", "🏴‍☠️", "🇯🇵", "🇺🇸🇬🇧", "1️⃣", "#️⃣", "❤️", "❤", "🫠", "🐈‍⬛",
    "😀😃😄", "🧑‍🤝‍🧑", "👁‍🗨", "☕", "✌🏻", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
]  # fmt: skip
MOJIBAKE = [
    "cafÃ©", "Ã©tÃ©", "â€œquotedâ€\x9d", "doesnÃ¢â‚¬â„¢t", "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.",
    "Ã¼ber", "æ—¥æœ¬", "ðŸ˜€", "Ã\xa0 la carte", "voilÃ le travail", "Ð¿Ñ€Ð¸Ð²ÐµÑ‚", "Ã¢â‚¬Å“", "sÃ³",
]  # fmt: skip
HTML = [
    "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&#39;", "&#x27;", "&#128512;", "&amp;amp;", "&amp;amp;amp;", "&amp;lt;",
    "&nbsp;", "&eacute;", "&EACUTE;", "&notit;", "&notin;", "&Amp;", "&#0;", "&#x110000;", "&#xD800;", "&",
    "AT&T", "&&", "&;", "&#;", "&unknown;", "fish &amp; chips", "<b>bold</b> &amp; more", "<i>&lt;</i>",
    "&quot;quoted&quot;", "&hellip;", "&mdash;", "&#8217;", "&amp;#39;",
]  # fmt: skip
PUNCTUATION = [
    "!!!", "?!?!", "...", "…", "---", "—", "–", "(a)", "[b]", "{c}", "<d>", "@user", "#hashtag", "$100", "100%",
    "a+b=c", "x*y/z", "~tilde~", "`code`", "|pipe|", "\\back\\slash", "^caret^", "\"quotes\"", "“curly”",
    "‘single’", "«guillemets»", "„low“", "¿qué?", "¡hola!", "•", "©®™", "§¶", "←→↑↓", "∑∫√∞", "°C", "<|", "|>",
    "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|StartOfText|>", "<|ſtartoftext|>", "x<|endoftext|>y",
    "<|endoftext|><|startoftext|>", "</w>", "a</w>b",
]  # fmt: skip
NUMBERS = [
    "0", "42", "1234567890", "3.14159", "-7", "1e10", "1,000,000", "½", "²³", "٣٤٥", "१२३", "Ⅻ", "ⅻ", "①②", "１２３",
    "0x1F", "v2.0.1", "2021-01-05", "12:30pm", "4k", "1080p", "3rd", "21st",
]  # fmt: skip
WHITESPACE = [
    " ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\u00a0", "\u3000", "\u2003", "\u2009", "\u202f", "\u1680",
    "\u180e", "\u200b", "\u2028", "\u2029", "\x85", "\x1c", "\x1f", "\ufeff",
]  # fmt: skip
CONTROL = ["\x00", "\x07", "\x08", "\x1b", "\x1b[31m", "\x1b[0m", "\x7f", "\x80", "\x9f", "\ud800", "\ufffd", "\u206a"]
FRAGMENT_POOLS = [WORDS, CONTRACTIONS, SCRIPTS, ACCENTED, EMOJI, MOJIBAKE, HTML, PUNCTUATION, NUMBERS, CONTROL]
POOL_WEIGHTS = [8, 3, 3, 2, 2, 1, 2, 3, 2, 1]
SEPARATORS = [" "] * 12 + WHITESPACE + [""] * 4

HANDPICKED = [
    "", " ", "   ", "\t\n\r ", "\u3000\u00a0", "\x0b", "\x1c\x1d", "\u200b", "a", "A", "I", "a photo of a cat",
    "A Photo Of A Cat.", "a   photo\tof\na\r\ncat", "  leading and trailing  ",
    "The quick brown fox jumps over the lazy dog",
    "e\u0301", "\u00e9", "Cafe\u0301 vs Caf\u00e9", "n\u0303o", "A\u030a", "\u1e9b\u0323", "ﬃ",
    "Don't stop believin'", "I'M GONNA", "it's 5 o'clock", "we'll've", "x's y't z're",
    "<|startoftext|>a photo<|endoftext|>", "<|startoftext|>", "<|endoftext|>",
    "&amp;", "&amp;amp;", "&amp;amp;amp;amp;", "&lt;3", "<3 &lt;3", "line1 &amp;\nline2 <b>", "<b>\n&amp;",
    "\x1b[1;31mred\x1b[0m", "tab\there", "null\x00byte", "bell\x07", "del\x7f", "soft\u00adhyphen",
    "ﾃｽﾄ", "ＦＵＬＬＷＩＤＴＨ", "Σ", "ΣΑΣ", "ὈΔΥΣΣΕΎΣ", "İ", "ı", "ǰ", "ß", "ﬀ", "K", "Å", "Ω",
    "👨‍👩‍👧‍👦👨‍👩‍👧‍👦", "🏳️‍🌈 pride", "👍🏻👍🏼👍🏽👍🏾👍🏿", "🇫🇷🇩🇪", "x" * 300, "ab" * 150, "🙂" * 40,
    "0123456789" * 5, "!" * 100, "a" * 1000, "supercalifragilisticexpialidocious", "pneumonoultramicroscopic",
    "https://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Windows\\System32", "#FF00AA", "rgb(1,2,3)",
]  # fmt: skip
LONG_WORDS = WORDS + ACCENTED + ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"]
PROMPT_ADJECTIVES = ["red", "blue", "small", "large", "old", "young", "happy", "sleepy", "wet", "fluffy", "shiny"]
PROMPT_NOUNS = ["cat", "dog", "car", "tree", "house", "bird", "boat", "chair", "lamp", "river", "mountain"]
# Fragments that look like what ftfy or html.unescape act on, written in the fast path's alphabet (no "&").
ASCII_TRICKY = [
    "amp;", "lt;", "#39;", "#x27;", "nbsp;", "[31m", "<b>", "</b>", "<|endoftext|>", "<|startoftext|>", "'s", "'LL",
    "\t", "\n", " \n ", "--", "...", '"', "'", "`", "\\", "~", "^", "1/2", "x2", "A~", "(c)", "(R)", "TM", "ij", "fi",
]  # fmt: skip
ASCII_ALPHABET = string.printable  # includes \t \n \r \x0b \x0c: the fuzz checks the fast path rejects the last three


def _pick_fragment(rng: random.Random) -> str:
    pool = rng.choices(FRAGMENT_POOLS, weights=POOL_WEIGHTS)[0]
    fragment = rng.choice(pool)
    roll = rng.random()
    if roll < 0.1:
        fragment = fragment.upper()
    elif roll < 0.15:
        fragment = unicodedata.normalize("NFD", fragment)
    elif roll < 0.2:
        # Mojibake made on the spot: UTF-8 bytes read as Latin-1 (ftfy repairs many of these).
        fragment = fragment.encode("utf-8", errors="surrogatepass").decode("latin-1")
    elif roll < 0.23:
        fragment = fragment.replace("&", "&amp;")
    return fragment


def mixed_texts(count: int = 1_200, seed: int = DEFAULT_SEED) -> list[str]:
    """Random mixtures of every fragment pool with varied separators: 1 to 12 fragments each, some empty."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        n = rng.choice([0, 1, 1, 2, 3, 4, 5, 6, 8, 12])
        parts = []
        for _ in range(n):
            parts.append(_pick_fragment(rng))
            parts.append(rng.choice(SEPARATORS))
        if rng.random() < 0.2:
            parts.insert(0, rng.choice(WHITESPACE))
        texts.append("".join(parts))
    return texts


def long_texts(count: int = 40, seed: int = DEFAULT_SEED + 1) -> list[str]:
    """Texts from about 20 to several hundred tokens, so both sides of the 77-token limit are covered."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        n_words = rng.randint(20, 250)
        texts.append(" ".join(rng.choice(LONG_WORDS) for _ in range(n_words)))
    texts.append("word " * 75)  # 75 ids: exactly fills 77 with start and end
    texts.append("word " * 76)  # one too many
    return texts


def corpus(seed: int = DEFAULT_SEED) -> list[str]:
    """Every hand-picked case, every pool entry on its own, random mixtures and long texts (over 1,000 in all)."""
    singles = [fragment for pool in [*FRAGMENT_POOLS, WHITESPACE] for fragment in pool]
    return [*HANDPICKED, *singles, *mixed_texts(seed=seed), *long_texts(seed=seed + 1)]


def ascii_fuzz_texts(count: int = 20_000, seed: int = DEFAULT_SEED + 2) -> list[str]:
    """Random ASCII strings (``string.printable`` plus tricky fragments), 0 to 60 pieces each."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(0, 60)):
            roll = rng.random()
            if roll < 0.6:
                pieces.append(rng.choice(ASCII_ALPHABET))
            elif roll < 0.8:
                pieces.append(rng.choice(ASCII_TRICKY))
            else:
                pieces.append(rng.choice(WORDS) + " ")
        texts.append("".join(pieces))
    return texts


def photo_prompts(count: int, seed: int = DEFAULT_SEED + 3) -> list[str]:
    """``count`` distinct short prompts in the style "a photo of a {adjective} {noun}, number {i}"."""
    rng = random.Random(seed)
    return [
        f"a photo of a {rng.choice(PROMPT_ADJECTIVES)} {rng.choice(PROMPT_NOUNS)}, number {i}" for i in range(count)
    ]
