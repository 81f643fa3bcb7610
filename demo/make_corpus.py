"""Write a small synthetic Japanese corpus for `make demo`, in the llm-jp shard format.

    python demo/make_corpus.py --out_dir demo_run/corpus

Out come train_0.jsonl.gz … train_{N-1}.jsonl.gz and validation_0.jsonl.gz: gzip'd JSON Lines, one
document per line, {"text": "段落1\\n段落2…", "meta": {"source": "demo", "doc_id": …}}, the same layout the
real corpora use, so every later step runs unchanged. The prose is written for this project from templates
and a few hundred content words: a tiny model learns its particles, verb endings and recurring scenes in a
couple of CPU minutes, so a demo sample visibly resembles it. Standard library only, deterministic per --seed.
"""
import argparse
import gzip
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
from trm.atomic import AtomicFile  # noqa: E402 (after the path)
from demo.vocabulary import (  # noqa: E402 (after the path)
    SURNAMES, CHILDREN, JOBS, KID_AGES, KID_JOBS, MEANS, PLACES, OUTDOORS, HOME_ACTS, ITEMS, SHOPS, SHOP_ITEMS, PETS,
    PET_INDOORS, PET_NAMES, PET_ACTS, STORY_ANIMALS, STORY_HOMES, STORY_IDLE, STORY_TRIPS, STORY_ACTS, FOODS,
    FOOD_ADJ, CITIES, TOWNS, SEASONS, PAST_TIMES, LATER_TIMES, FUTURE_TIMES, HABIT_TIMES, TOWN_TIMES, SIBLINGS,
    FEELINGS)

# -----------------------------------------------------------------------------------------------------------
# grammar: verbs are stored in dictionary form and conjugated here, so every template gets its form right

# る-verbs that conjugate as ichidan; every other る-verb is godan (帰る → 帰って, not 帰て)
ICHIDAN = {"食べる", "見る", "寝る", "起きる", "借りる", "浴びる", "出る", "出かける", "見つける", "教える",
           "育てる", "集める", "届ける", "投げる", "考える", "始める", "晴れる", "答える", "診る", "いる", "着る",
           "植える", "調べる", "並べる", "疲れる", "ためる", "煮る", "増える", "開ける"}
I_ROW = dict(zip("うくぐすつぬぶむる", "いきぎしちにびみり"))
A_ROW = dict(zip("うくぐすつぬぶむる", "わかがさたなばまら"))
TE = {"う": "って", "つ": "って", "る": "って", "く": "いて", "ぐ": "いで", "す": "して", "ぬ": "んで", "ぶ": "んで",
      "む": "んで"}


def stems(verb):
    """(連用形, て形, 未然形) of a verb in dictionary form."""
    if verb.endswith("する"):
        s = verb[:-2]
        return s + "し", s + "して", s + "し"
    if verb.endswith("来る"):
        s = verb[:-2]
        return s + "来", s + "来て", s + "来"
    if verb in ICHIDAN:
        s = verb[:-1]
        return s, s + "て", s
    s, u = verb[:-1], verb[-1]
    te = s + ("って" if verb.endswith("行く") else TE[u])  # 行く is the one irregular godan て-form
    return s + I_ROW[u], te, s + A_ROW[u]


def conj(verb, form, polite):
    masu, te, nai = stems(verb)
    ta = te[:-1] + ("だ" if te.endswith("で") else "た")
    if polite:
        return {"pres": masu + "ます", "past": masu + "ました", "neg": masu + "ません",
                "neg_past": masu + "ませんでした", "prog": te + "います", "prog_past": te + "いました",
                "tai": masu + "たいです", "te": te, "dict": verb, "stem": masu}[form]
    return {"pres": verb, "past": ta, "neg": nai + "ない", "neg_past": nai + "なかった", "prog": te + "いる",
            "prog_past": te + "いた", "tai": masu + "たい", "te": te, "dict": verb, "stem": masu}[form]


def vp(phrase, form, polite):
    """'本を|読む' -> '本を読みました': the part before | is kept, the verb after it is conjugated."""
    pre, verb = phrase.split("|")
    return pre + conj(verb, form, polite)


def adj_pred(adj, past, polite):
    """Predicative adjective: 静かな -> 静かでした, 青い -> 青かったです (い- and な-adjectives differ)."""
    if adj.endswith("な"):
        return adj[:-1] + {(0, 1): "です", (1, 1): "でした", (0, 0): "だ", (1, 0): "だった"}[past, polite]
    if adj == "いい":
        adj = "よい"  # いい borrows よ- for every other form: よかった
    return (adj[:-1] + "かった" if past else adj) + ("です" if polite else "")


def kanji(n):
    """1..99 in kanji numerals, as prose writes them: 三, 十二, 二十五."""
    tens, ones = divmod(n, 10)
    return (("" if tens == 1 else "〇一二三四五六七八九"[tens]) + "十" if tens else "") + \
        ("〇一二三四五六七八九"[ones] if ones else "")


def count(n, counter):
    return kanji(n) + counter


# -----------------------------------------------------------------------------------------------------------
# paragraphs: each takes the document's cast `c` and returns a list of sentences

def S(*parts):
    return "".join(parts) + "。"


def p_intro(rng, c):
    n, pol = c["name"], c["polite"]
    da = "です" if pol else "だ"
    out = [S(n, "は", c["job"], da)]
    out.append(S(c["town"], "に住んで", "います" if pol else "いる"))
    out.append(S(n, "は", count(c["age"], "歳"), da))
    if rng.random() < 0.6:
        study = c["work"] in ("学校", "大学")
        out.append(S("毎日", c["work"], "で", "勉強して" if study else "働いて", "います" if pol else "いる"))
    if rng.random() < 0.5:
        sib = rng.choice(SIBLINGS)
        k = rng.randint(1, 2)
        out.append(S(n, "には", sib, "が", count(k, "人"), "います" if pol else "いる"))
    if rng.random() < 0.4:
        out.append(S(n, "の家族は", count(rng.randint(3, 6), "人"), da))
    if c["pet"]:
        pet, adj = c["pet"], c["pet_adj"]
        out.append(S("家には", adj, pet, "が", count(1, "匹"), "います" if pol else "いる"))
        out.append(S(pet, "の名前は", c["pet_name"], da))
    return out


def p_routine(rng, c):
    n, pol = c["name"], c["polite"]
    wake, leave = rng.randint(5, 7), rng.randint(7, 9)
    out = [S(n, "は毎朝", count(wake, "時"), "に", conj("起きる", "pres", pol))]
    first = rng.choice(["顔を|洗う", "シャワーを|浴びる", "窓を|開ける"])
    out.append(S(vp(first, "te", pol), "、朝ご飯を", conj("食べる", "pres", pol)))
    out.append(S(count(leave, "時"), rng.choice(["", "半"]), "に家を", conj("出る", "pres", pol)))
    out.append(S(c["work"], "まで", rng.choice(MEANS), conj("行く", "pres", pol)))
    acts = rng.sample(c["acts"], min(2, len(c["acts"])))
    out.append(S(c["work"], "では", vp(acts[0], "te" if len(acts) > 1 else "pres", pol),
                 ("、" + vp(acts[1], "pres", pol)) if len(acts) > 1 else ""))
    if rng.random() < 0.5:
        out.append(S("昼は", rng.choice(FOOD_ADJ), rng.choice(FOODS), "を", conj("食べる", "pres", pol)))
    out.append(S("夕方", count(rng.randint(5, 7), "時"), "ごろ、家に", conj("帰る", "pres", pol)))
    out.append(S("晩ご飯の後で、", vp(rng.choice(HOME_ACTS), "pres", pol)))
    out.append(S("夜は", count(rng.randint(9, 11), "時"), "に", conj("寝る", "pres", pol)))
    # a routine is long; short docs still get a recognisable slice of it
    return out[:rng.randint(4, len(out))]


def p_outing(rng, c):
    n, pol = c["name"], c["polite"]
    place = rng.choice(list(PLACES))
    adjs, things, beings, acts = PLACES[place]
    when = rng.choice(LATER_TIMES if c["outings"] else PAST_TIMES)
    c["outings"] += 1
    friend = c["friend"] if rng.random() < 0.6 else None
    who = "二人は" if friend else n + "は"
    out = [S(when, "、", n, "は", friend + "と" if friend else "", place, rng.choice(["へ", "に"]),
             conj("行く", "past", pol))]
    r = rng.random()
    if r < 0.3:
        out.append(S("その日はよく", conj("晴れる", "prog_past", pol)))
    elif r < 0.5:
        out.append(S("その日は少し風が", adj_pred("強い", 1, pol)))
    out.append(S(place, "はとても", adj_pred(rng.choice(adjs), 1, pol)))
    a, b = rng.sample(acts, 2)
    out.append(S(who, place, "で", vp(a, "te", pol), "、", vp(b, "past", pol)))
    if rng.random() < 0.6:
        # ある for things, いる for living beings
        if rng.random() < 0.5:
            out.append(S(place, "には", rng.choice(things), "が", "ありました" if pol else "あった"))
        else:
            out.append(S(place, "には", rng.choice(beings), "が", "いました" if pol else "いた"))
    if place in OUTDOORS and rng.random() < 0.5:
        kids = rng.randint(2, 9)
        out.append(S(count(kids, "人"), "の子どもが", place, "で", conj("遊ぶ", "prog_past", pol)))
    if rng.random() < 0.5:
        shop = rng.choice(SHOPS)
        item = rng.choice(SHOP_ITEMS[shop])
        counter, iadj = ITEMS[item]
        k = rng.randint(2, 9)
        if counter == "個" and rng.random() < 0.5:
            counter = "つ"  # りんごを三つ: the native counter reads as naturally as 個
        r = rng.random()
        if r < 0.3:
            out.append(S("それから、", shop, "で", item, "を", count(k, counter), conj("買う", "past", pol)))
        elif r < 0.6:
            out.append(S("それから、", shop, "で", count(k, counter), "の", item, "を", conj("買う", "past", pol)))
        else:
            out.append(S("帰りに、", shop, "で", rng.choice(iadj), item, "を", count(k, counter),
                         conj("買う", "past", pol)))
    if friend and rng.random() < 0.5:
        out.append(S("「また来たいですね」と", friend, "が", conj("言う", "past", pol)))
    adj, noun = rng.choice(FEELINGS)
    out.append(S("とても", adj, noun, "でした" if pol else "だった"))
    return out


def p_rain(rng, c):
    """しかし / だから: a plan, the weather against it, and what was done instead."""
    n, pol = c["name"], c["polite"]
    place = rng.choice(list(PLACES))
    act = rng.choice(PLACES[place][3])
    out = [S(rng.choice(PAST_TIMES), "、", n, "は", place, "へ行って、", vp(act, "stem", pol), "たいと思って",
             "いました" if pol else "いた")]
    weather = rng.choice(["雨が", "雪が"])
    out.append(S("しかし、朝から", weather, conj("降る", "prog_past", pol)))
    h1, h2 = rng.sample(HOME_ACTS, 2)
    if rng.random() < 0.5:
        out.append(S("だから、", n, "は", place, "へ", conj("行く", "neg_past", pol)))
        out.append(S("家で", vp(h1, "past", pol)))
    else:
        out.append(S("だから、", n, "は家で", vp(h1, "past", pol)))
    out.append(S("それから、", vp(h2, "past", pol)))
    if rng.random() < 0.5:
        out.append(S("夕方になると、", weather, conj("止む", "past", pol)))
    return out


def p_home(rng, c):
    """～ている: a scene described as it is happening."""
    n, pol = c["name"], c["polite"]
    a = rng.choice(HOME_ACTS)
    out = [S("今、", n, "は家で", vp(a, "prog", pol))]
    out.append(S("窓の外では", rng.choice(["雨", "雪"]), "が", conj("降る", "prog", pol)))
    if c["pet"]:
        out.append(S(c["pet_name"], "は", vp(PET_INDOORS[c["pet"]], "prog", pol)))
    if rng.random() < 0.5:
        out.append(S(rng.choice(HABIT_TIMES), "、", n, "は", vp(rng.choice(HOME_ACTS), "pres", pol)))
    out.append(S(n, "は", vp(a, "dict", pol), "のが好き", "です" if pol else "だ"))
    return out


def p_wish(rng, c):
    """～たい: what the character wants to do, then a reason with だから."""
    n, pol = c["name"], c["polite"]
    city = rng.choice(list(CITIES))
    out = [S(n, "は", rng.choice(FUTURE_TIMES), "、", city, "へ", conj("行く", "tai", pol))]
    out.append(S("そこで", vp(CITIES[city], "tai", pol)))
    if rng.random() < 0.5:
        f = rng.choice(FOODS)
        out.append(S(city, "で", rng.choice(FOOD_ADJ), f, "も", conj("食べる", "tai", pol)))
    out.append(S("だから、今は", vp(rng.choice(["お金を|ためる", "地図を|調べる", "旅行の本を|読む"]), "prog", pol)))
    if c["friend"] and rng.random() < 0.5:
        # what is quoted before と stays plain (行きたいと), whatever the register around it
        out.append(S(c["friend"], "もいっしょに", conj("行く", "tai", False), "と", conj("言う", "prog", pol)))
    return out


def p_pet(rng, c):
    if not c["pet"]:
        return p_home(rng, c)
    pol, pet, name = c["polite"], c["pet"], c["pet_name"]
    out = [S(name, "は", c["pet_adj"], pet, "です" if pol else "だ")]
    out.append(S(name, "は毎日", vp(rng.choice(PET_ACTS[pet]), "pres", pol)))
    out.append(S(c["name"], "は", name, "が大好き", "です" if pol else "だ"))
    if rng.random() < 0.5:
        out.append(S(rng.choice(PAST_TIMES), "、", name, "は", rng.choice(["庭", "公園", "家の前"]), "で",
                     rng.choice(["小さい鳥", "大きい虫", "白い石"]), "を", conj("見つける", "past", pol)))
    return out


def p_season(rng, c):
    n, pol = c["name"], c["polite"]
    season = rng.choice(list(SEASONS))
    happens, places = SEASONS[season]
    place = rng.choice(places)
    act = rng.choice(PLACES[place][3])
    out = [S(season, "になると、", vp(rng.choice(happens), "pres", pol))]
    out.append(S(n, "は", season, "が一番好き", "です" if pol else "だ"))
    out.append(S(season, "には、よく", place, "で", vp(act, "pres", pol)))
    if rng.random() < 0.5:
        out.append(S("しかし、", season, "は少し", adj_pred(rng.choice(["短い", "忙しい"]), 0, pol)))
    return out


def p_visit(rng, c):
    """Dialogue: quoted speech stays polite whatever the narration's register."""
    n, pol, f = c["name"], c["polite"], c["friend"]
    place = rng.choice(list(PLACES))
    say = lambda form: conj("言う", form, pol)
    out = [S(rng.choice(PAST_TIMES), "、", f, "が", n, "の家に", conj("来る", "past", pol))]
    out.append(S("「こんにちは」と", f, "が", say("past")))
    out.append(S("「いっしょに", place, "へ行きませんか」と", f, "は", say("past")))
    out.append(S("「いいですね。行きましょう」と", n, "は", conj("答える", "past", pol)))
    a = rng.choice(PLACES[place][3])
    out.append(S("二人は", place, "へ", conj("行く", "te", pol), "、", vp(a, "past", pol)))
    return out


PARAGRAPHS = [p_routine, p_outing, p_outing, p_rain, p_home, p_wish, p_pet, p_season, p_visit]


def person_doc(rng, target):
    kid = rng.random() < 0.3
    jobs = KID_JOBS if kid else JOBS
    job = rng.choice(list(jobs))
    pool = CHILDREN if kid else [s + "さん" for s in SURNAMES]
    name, friend = rng.sample(pool, 2)
    pet = rng.choice(list(PETS)) if rng.random() < 0.6 else None
    c = dict(name=name, friend=friend, job=job, work=jobs[job][0], acts=jobs[job][1], town=rng.choice(TOWNS),
             age=rng.randint(*KID_AGES[job]) if kid else rng.randint(22, 70), polite=rng.random() < 0.6, outings=0,
             pet=pet, pet_adj=rng.choice(PETS[pet]) if pet else None, pet_name=rng.choice(PET_NAMES))
    # paragraph kinds are dealt from a shuffled deck, so a long document cycles through all of them
    # instead of repeating one scene back to back
    paras, deck = ["".join(p_intro(rng, c))], []
    while sum(map(len, paras)) < target:
        if not deck:
            deck = rng.sample(PARAGRAPHS, len(PARAGRAPHS))
        paras.append("".join(deck.pop()(rng, c)))
    return paras


def story_doc(rng, target):
    """A fable in plain past tense: two animals meet, do things together, weather turns, they become friends."""
    a, b = rng.sample(list(STORY_ANIMALS), 2)
    home = rng.choice(STORY_HOMES)
    paras = ["".join([S("昔々、ある", home, "に", rng.choice(STORY_ANIMALS[a]), a, "がいた"),
                      S(a, "は毎日", home, "で", vp(rng.choice(STORY_IDLE), "prog_past", False))])]
    met = False
    while sum(map(len, paras)) < target:
        dest, purpose = rng.choice(STORY_TRIPS)
        out = [S(rng.choice(["ある日", "次の日", "ある朝", "その日の午後"]), "、", a, "は", dest, "へ",
                 vp(purpose, "stem", False), "に行った")]
        # the second animal is introduced with an adjective once, then met "again"
        out.append(S(dest, "で、", "また" + b if met else rng.choice(STORY_ANIMALS[b]) + b, "に会った"))
        out.append(S("「こんにちは」と", a, "は言った"))
        out.append(S("「こんにちは。いっしょに遊びませんか」と", b, "は答えた"))
        x, y = rng.sample(STORY_ACTS, 2)
        out.append(S("二匹は", vp(x, "te", False), "、", vp(y, "past", False)))
        if rng.random() < 0.6:
            weather = rng.choice(["雨", "風", "雪"])
            out.append(S("しかし、急に", weather, "が", "強くなった" if weather == "風" else "降ってきた"))
            out.append(S("だから、二匹は大きい木の下で", weather, "がやむのを", conj("待つ", "past", False)))
            if weather == "雨" and rng.random() < 0.5:
                out.append(S("しばらくすると、空に虹が出た"))
        out.append(S("夕方になると、", a, "は", home, "の家に", conj("帰る", "past", False)))
        paras.append("".join(out))
        met = True
    paras.append(S("それから、", a, "と", b, "はいい友だちになった"))
    return paras


def town_doc(rng, target):
    """A description of a town in polite style: existence (ある/いる), counters, habitual present."""
    town = rng.choice(TOWNS)
    paras = []
    while sum(map(len, paras)) < target:
        place = rng.choice(list(PLACES))
        adjs, things, beings, acts = PLACES[place]
        shop = rng.choice(SHOPS)
        out = [S(town, "は", rng.choice(["小さい", "静かな", "にぎやかな", "古い"]), "町です")] if not paras else []
        out.append(S("町の", rng.choice(["真ん中", "北", "南", "東", "西"]), "に", rng.choice(adjs), place, "があります"))
        out.append(S(place, "には", rng.choice(things), "があります"))
        out.append(S("そして、", rng.choice(beings), "がいます"))
        out.append(S(rng.choice(["駅の前に", "川の近くに", "学校のそばに"]), shop, "が", count(rng.randint(1, 4), "軒"), "あります"))
        items = SHOP_ITEMS[shop]
        out.append(S(shop, "では", "や".join(rng.sample(items, min(2, len(items)))), "を売っています"))
        out.append(S(rng.choice(TOWN_TIMES), "、町の人は", place, "で", vp(rng.choice(acts), "pres", True)))
        if rng.random() < 0.5:
            out.append(S("朝になると、", count(rng.randint(2, 9), "人"), "の子どもが学校へ歩いて行きます"))
        paras.append("".join(out))
    paras.append(S("町の人はみんな", rng.choice(["親切です", "元気です", "この町が大好きです"])))
    return paras


def make_doc(rng):
    # lengths: ~25% short (≈100 chars), most a few hundred, ~8% long (2,500–4,500) so long documents exist
    r = rng.random()
    target = rng.randint(40, 150) if r < 0.25 else rng.randint(200, 900) if r < 0.92 else rng.randint(2500, 4500)
    kind = rng.choices([person_doc, story_doc, town_doc], weights=[6, 2, 2])[0]
    return "\n".join(kind(rng, target))


# -----------------------------------------------------------------------------------------------------------

def write_shard(path, docs, prefix):
    lines = [json.dumps({"text": t, "meta": {"source": "demo", "doc_id": f"{prefix}-{i:05d}"}}, ensure_ascii=False)
             for i, t in enumerate(docs)]
    # mtime=0 and no file name in the header: the same seed gives byte-identical shards
    data = gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0)
    with AtomicFile(path) as f:
        f.write(data)
    return len(data)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--train_shards", type=int, default=11)
    # 100 docs × 11 shards ≈ 0.85 M chars ≈ 2.5 MB of UTF-8 text: a few CPU minutes of training, not many epochs
    parser.add_argument("--docs_per_shard", type=int, default=100)
    parser.add_argument("--valid_docs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.time()
    os.makedirs(args.out_dir, exist_ok=True)

    seen, n_chars, n_bytes, n_docs = set(), 0, 0, 0
    # one string-seeded stream per shard: deterministic across runs and Python versions (str seeds are hashed
    # with sha512), and shard k does not depend on how many docs the others hold
    for k in range(args.train_shards):
        rng = random.Random(f"demo-{args.seed}-train-{k}")
        docs = [make_doc(rng) for _ in range(args.docs_per_shard)]
        seen.update(docs)
        n_chars += sum(map(len, docs))
        n_docs += len(docs)
        n_bytes += write_shard(os.path.join(args.out_dir, f"train_{k}.jsonl.gz"), docs, f"train{k}")
    train_chars = n_chars
    rng = random.Random(f"demo-{args.seed}-validation")
    docs = []
    while len(docs) < args.valid_docs:
        d = make_doc(rng)
        if d not in seen:  # short docs can repeat by chance; validation must not be in train
            docs.append(d)
    n_bytes += write_shard(os.path.join(args.out_dir, "validation_0.jsonl.gz"), docs, "validation0")
    print(f"wrote {args.train_shards + 1} files to {args.out_dir}: train {n_docs} docs {train_chars:,} chars, "
          f"validation {len(docs)} docs {sum(map(len, docs)):,} chars, {n_bytes / 1e6:.2f} MB gzip, "
          f"{time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
