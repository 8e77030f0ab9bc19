"""Generate the embedded sample corpus (``corpus_manifests/sample/``) that ``make corpus`` builds.

Deterministic (seeded): the same script always writes the same bytes. About 450 documents in
eleven languages and scripts (Latin, Cyrillic, Arabic, Devanagari, Han, kana, Hangul) plus
source code, in every supported format, with planted problems so each stage does something:

- exact duplicates (within and across components), near duplicates (a few words changed),
- bad rows: a non-JSON line, a row without the text field, undecodable bytes, an empty text,
  a non-string text, an oversized document; and documents the filters drop (too short,
  repeated lines, a long character run).

Text is built from small hand-written word lists and sentence templates (written for this
project), so documents are varied enough that unrelated ones are never near-duplicates.

    python corpus_manifests/sample/make_sample.py [--out corpus_manifests/sample] [--scale 1]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random

WORDS = {
    "en": ("river mountain library engine garden winter theory market harbor village signal crystal "
           "language window forest machine student castle bridge planet history summer orchard "
           "museum lantern compass valley meadow island bakery tower canal ferry meteor glacier").split(),
    "de": ("Fluss Berg Bibliothek Motor Garten Winter Theorie Markt Hafen Dorf Signal Kristall Sprache "
           "Fenster Wald Maschine Student Burg Brücke Planet Geschichte Sommer Museum Laterne Tal "
           "Wiese Insel Bäckerei Turm Kanal Fähre Gletscher").split(),
    "fr": ("rivière montagne bibliothèque moteur jardin hiver théorie marché port village signal "
           "cristal langue fenêtre forêt machine étudiant château pont planète histoire été musée "
           "lanterne vallée prairie île boulangerie tour canal glacier").split(),
    "es": ("río montaña biblioteca motor jardín invierno teoría mercado puerto pueblo señal cristal "
           "idioma ventana bosque máquina estudiante castillo puente planeta historia verano museo "
           "farol valle pradera isla panadería torre canal glaciar").split(),
    "ru": ("река гора библиотека двигатель сад зима теория рынок гавань деревня сигнал кристалл "
           "язык окно лес машина студент замок мост планета история лето музей фонарь долина луг "
           "остров пекарня башня канал ледник").split(),
    "ar": ("نهر جبل مكتبة محرك حديقة شتاء نظرية سوق ميناء قرية إشارة بلورة لغة نافذة غابة آلة "
           "طالب قلعة جسر كوكب تاريخ صيف متحف فانوس وادي مرج جزيرة مخبز برج قناة").split(),
    "hi": ("नदी पहाड़ पुस्तकालय इंजन बगीचा सर्दी सिद्धांत बाज़ार बंदरगाह गाँव संकेत क्रिस्टल भाषा खिड़की "
           "जंगल मशीन छात्र किला पुल ग्रह इतिहास गर्मी संग्रहालय लालटेन घाटी मैदान द्वीप बेकरी मीनार नहर").split(),
    "zh": ("河流 山脉 图书馆 发动机 花园 冬天 理论 市场 港口 村庄 信号 水晶 语言 窗户 森林 机器 学生 "
           "城堡 桥梁 行星 历史 夏天 博物馆 灯笼 山谷 草地 岛屿 面包店 高塔 运河 冰川").split(),
    "ja": ("川 山 図書館 エンジン 庭園 冬 理論 市場 港 村 信号 水晶 言語 窓 森 機械 学生 城 橋 惑星 "
           "歴史 夏 博物館 提灯 谷 草原 島 パン屋 塔 運河 氷河").split(),
    "ko": ("강 산 도서관 엔진 정원 겨울 이론 시장 항구 마을 신호 수정 언어 창문 숲 기계 학생 성 다리 "
           "행성 역사 여름 박물관 등불 계곡 초원 섬 빵집 탑 운하 빙하").split(),
    "el": ("ποτάμι βουνό βιβλιοθήκη μηχανή κήπος χειμώνας θεωρία αγορά λιμάνι χωριό σήμα κρύσταλλο "
           "γλώσσα παράθυρο δάσος μηχάνημα φοιτητής κάστρο γέφυρα πλανήτης ιστορία καλοκαίρι μουσείο").split(),
}
TEMPLATES = {
    "en": ["The {a} near the {b} was first described in {n}.", "Travellers crossing the {a} often stop at the {b}.",
           "In {n}, a {a} replaced the old {b} entirely.", "Local records mention a {a}, a {b} and a {c}.",
           "Nobody expected the {a} to outlast the {b} by {n} years."],
    "de": ["Der {a} am {b} wurde {n} zum ersten Mal beschrieben.", "Reisende machen am {a} oft Halt beim {b}.",
           "Im Jahr {n} ersetzte ein {a} den alten {b}.", "Alte Chroniken nennen {a}, {b} und {c}."],
    "fr": ["Le {a} près du {b} fut décrit pour la première fois en {n}.", "Les voyageurs traversant la {a} s'arrêtent au {b}.",
           "En {n}, un {a} remplaça l'ancien {b}.", "Les archives mentionnent {a}, {b} et {c}."],
    "es": ["El {a} junto al {b} se describió por primera vez en {n}.", "Quien cruza el {a} suele parar en el {b}.",
           "En {n}, un {a} sustituyó al viejo {b}.", "Los registros citan {a}, {b} y {c}."],
    "ru": ["{a} у {b} впервые описали в {n} году.", "Путники, пересекающие {a}, останавливаются у {b}.",
           "В {n} году {a} полностью заменил {b}.", "В летописях упоминаются {a}, {b} и {c}."],
    "ar": ["وُصف {a} قرب {b} لأول مرة عام {n}.", "يتوقف المسافرون عبر {a} عند {b} غالبًا.",
           "في عام {n} حلّ {a} محل {b} القديم.", "تذكر السجلات {a} و{b} و{c}."],
    "hi": ["{b} के पास {a} का वर्णन पहली बार {n} में हुआ।", "{a} पार करने वाले यात्री अक्सर {b} पर रुकते हैं।",
           "{n} में एक {a} ने पुराने {b} की जगह ली।", "अभिलेखों में {a}, {b} और {c} का उल्लेख है।"],
    "zh": ["{b}附近的{a}最早记载于{n}年。", "穿过{a}的旅人常在{b}停留。", "{n}年，新的{a}取代了旧的{b}。",
           "地方志提到了{a}、{b}和{c}。"],
    "ja": ["{b}の近くの{a}は{n}年に初めて記録された。", "{a}を渡る旅人はよく{b}で休む。",
           "{n}年に新しい{a}が古い{b}に代わった。", "記録には{a}と{b}と{c}が登場する。"],
    "ko": ["{b} 근처의 {a}은 {n}년에 처음 기록되었다.", "{a}을 건너는 여행자들은 {b}에서 쉬어 간다.",
           "{n}년에 새 {a}이 옛 {b}을 대신했다.", "기록에는 {a}, {b}, {c}이 나온다."],
    "el": ["Το {a} κοντά στο {b} περιγράφηκε πρώτη φορά το {n}.", "Οι ταξιδιώτες σταματούν στο {b} μετά το {a}.",
           "Το {n} ένα νέο {a} αντικατέστησε το παλιό {b}.", "Τα αρχεία αναφέρουν {a}, {b} και {c}."],
}
SEP = {"zh": "", "ja": ""}


def prose(rng: random.Random, lang: str, paragraphs: int) -> str:
    w, t = WORDS[lang], TEMPLATES[lang]
    out = []
    for _ in range(paragraphs):
        sents = [rng.choice(t).format(a=rng.choice(w), b=rng.choice(w), c=rng.choice(w), n=rng.randint(1000, 2024))
                 for _ in range(rng.randint(3, 7))]
        out.append(SEP.get(lang, " ").join(sents))
    return "\n\n".join(out)


def python_code(rng: random.Random) -> str:
    name = rng.choice(WORDS["en"])
    k = rng.randint(2, 9)
    return (f'"""Utilities for the {name} registry."""\n\nimport math\n\n\n'
            f"def {name}_score(values, k={k}):\n    total = 0.0\n    for i, v in enumerate(values):\n"
            f"        total += math.log1p(abs(v)) * (i % k + 1)\n    return total / max(1, len(values))\n\n\n"
            f"class {name.title()}Index:\n    def __init__(self, items):\n        self.items = sorted(items)\n\n"
            f"    def find(self, x):\n        lo, hi = 0, len(self.items)\n        while lo < hi:\n"
            f"            mid = (lo + hi) // 2\n            if self.items[mid] < x:\n                lo = mid + {1}\n"
            f"            else:\n                hi = mid\n        return lo\n\n\nLIMIT_{name.upper()} = {rng.randint(10, 9999)}\n")


def rust_code(rng: random.Random) -> str:
    name = rng.choice(WORDS["en"])
    return (f"/// Running statistics for {name} readings.\npub struct {name.title()}Stats {{\n    n: u64,\n"
            f"    mean: f64,\n    m2: f64,\n}}\n\nimpl {name.title()}Stats {{\n    pub fn push(&mut self, x: f64) {{\n"
            f"        self.n += 1;\n        let d = x - self.mean;\n        self.mean += d / self.n as f64;\n"
            f"        self.m2 += d * (x - self.mean);\n    }}\n\n    pub fn variance(&self) -> f64 {{\n"
            f"        if self.n < 2 {{ 0.0 }} else {{ self.m2 / (self.n - 1) as f64 }}\n    }}\n}}\n\n"
            f"const THRESHOLD: f64 = {rng.random():.6f};\n")


def js_code(rng: random.Random) -> str:
    name = rng.choice(WORDS["en"])
    return (f"// Debounced fetch of {name} data.\nexport function debounce(fn, ms = {rng.randint(50, 900)}) {{\n"
            f"  let t = null;\n  return (...args) => {{\n    clearTimeout(t);\n    t = setTimeout(() => fn(...args), ms);\n"
            f"  }};\n}}\n\nexport async function load{name.title()}(url) {{\n  const res = await fetch(url);\n"
            f"  if (!res.ok) throw new Error(`{name}: ${{res.status}}`);\n  return res.json();\n}}\n")


def near_copy(rng: random.Random, text: str) -> str:
    """The same document with two words swapped for others (Jaccard of 5-grams stays > 0.8)."""
    words = text.split(" ")
    for _ in range(2):
        i = rng.randrange(len(words))
        words[i] = words[i][::-1] if len(words[i]) > 3 else words[i] + "s"
    return " ".join(words)


def jsonl(rows: list) -> bytes:
    out = io.BytesIO()
    for r in rows:
        out.write(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode())
        out.write(b"\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--scale", type=int, default=1, help="multiply the number of documents")
    ap.add_argument("--seed", type=int, default=20230424)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    out = args.out
    os.makedirs(out, exist_ok=True)
    s = args.scale

    # wiki: jsonl with ids, seven languages, planted bad rows and duplicates
    wiki = []
    for lang in ("en", "de", "fr", "es", "ru", "ar", "hi", "el"):
        for i in range(18 * s):
            wiki.append({"id": f"wiki-{lang}-{i:04d}", "lang": lang, "text": prose(rng, lang, rng.randint(2, 6))})
    rng.shuffle(wiki)
    long_doc = wiki[3]["text"]
    wiki.insert(10, {"id": "wiki-dup-exact", "text": wiki[5]["text"]})           # exact duplicate
    wiki.insert(20, {"id": "wiki-dup-near", "text": near_copy(rng, wiki[7]["text"] + "\n\n" + long_doc)})
    wiki.insert(21, {"id": "wiki-near-src", "text": wiki[7]["text"] + "\n\n" + long_doc})
    wiki.insert(30, b'{"id": "broken", "text": "unterminated')                   # bad_json
    wiki.insert(31, {"id": "no-text", "body": "the text lives in another field"})   # missing_text
    wiki.insert(32, b'{"id": "latin1", "text": "caf\xe9 au lait"}')              # not_utf8
    wiki.insert(33, {"id": "empty", "text": "   "})                               # empty
    wiki.insert(34, {"id": "number", "text": 12345})                             # missing_text (not a string)
    wiki.insert(35, {"id": "short", "text": "ok"})                               # too_short
    os.makedirs(os.path.join(out, "wiki"), exist_ok=True)
    half = len(wiki) // 2
    for part, rows in enumerate((wiki[:half], wiki[half:])):
        with open(os.path.join(out, "wiki", f"part-{part}.jsonl"), "wb") as f:
            f.write(jsonl(rows))

    # news: CJK, jsonl.gz
    news = [{"text": prose(rng, lang, rng.randint(2, 5))} for lang in ("zh", "ja", "ko") for _ in range(25 * s)]
    rng.shuffle(news)
    news.append({"text": news[4]["text"]})                                        # exact dup within
    news.append({"text": wiki[5]["text"]})                                        # exact dup across components
    src = max(news[:20], key=lambda r: len(r["text"]))["text"]
    i = len(src) // 3
    news.append({"text": src[:i] + "新" + src[i + 1:2 * i] + "。" + src[2 * i + 1:]})  # near dup, 2 chars changed
    with gzip.GzipFile(os.path.join(out, "news_cjk.jsonl.gz"), "wb", mtime=0) as f:
        f.write(jsonl(news))

    # forum: jsonl.zst, filter fodder and an oversized row (component max_doc_bytes is small)
    import zstandard

    forum = [{"text": prose(rng, rng.choice(("en", "es", "fr")), rng.randint(1, 3))} for _ in range(40 * s)]
    forum.insert(3, {"text": "\n".join(["buy now, limited offer!"] * 12)})         # dup_lines
    forum.insert(6, {"text": "Great product, would buy again " + "!" * 400})                                  # char_run
    forum.insert(9, {"text": prose(rng, "en", 6) * 40})                            # oversized
    forum.insert(12, {"text": "ha " * 30})                                   # low_diversity
    forum.append({"text": wiki[12]["text"]})                                       # exact dup across
    with open(os.path.join(out, "forum.jsonl.zst"), "wb") as f:
        f.write(zstandard.ZstdCompressor(level=9).compress(jsonl(forum)))

    # code: parquet with path ids
    import pyarrow as pa
    import pyarrow.parquet as pq

    gens = (python_code, rust_code, js_code)
    ext = {python_code: "py", rust_code: "rs", js_code: "js"}
    code = []
    for i in range(45 * s):
        g = gens[i % 3]
        note = prose(rng, "en", 1).replace("\n", " ")
        comment = {"py": "# ", "rs": "// ", "js": "// "}[ext[g]] + note
        code.append({"path": f"repo{i % 7}/src/file{i:04d}.{ext[g]}", "content": comment + "\n" + g(rng)})
    code.append({"path": "repo9/src/copy.py", "content": code[0]["content"]})   # exact dup
    pq.write_table(pa.Table.from_pylist(code), os.path.join(out, "code.parquet"), compression="zstd")

    # books: one document per txt file
    os.makedirs(os.path.join(out, "books"), exist_ok=True)
    for i, lang in enumerate(("en", "fr", "de", "ru", "zh", "ja")):
        with open(os.path.join(out, "books", f"book-{i}-{lang}.txt"), "w", encoding="utf-8") as f:
            f.write(prose(rng, lang, 12))

    # dialog: a datasets save_to_disk folder
    import datasets

    turns = []
    for i in range(30 * s):
        lang = ("en", "zh", "ko")[i % 3]
        turns.append({"text": f"User: {prose(rng, lang, 1)}\n\nAssistant: {prose(rng, lang, 2)}"})
    ds = datasets.Dataset.from_list(turns)
    path = os.path.join(out, "dialog")
    if os.path.exists(path):
        import shutil

        shutil.rmtree(path)
    ds.save_to_disk(path)


if __name__ == "__main__":
    main()
