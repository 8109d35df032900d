"""The moderation bench's workload: a synthetic lexicon and a corpus of customer-service messages.

The lexicon (`write_lexicon`): Chinese words of 2-4 characters and English words and phrases in mask,
review and block categories, plus a whitelist, none found in the sample sentences. The corpus
(`build_corpus`): whole sample sentences (Chinese and English mixed, some traditional, emoji and full-width
characters), one message in twenty carrying a listed word, some with noise between its characters or in
traditional characters.
"""

from __future__ import annotations

import random
from pathlib import Path

from services.common.lexicon.normalize import normalize
from services.moderation.lexicon import Action

# Sentences a shop's visitors and assistant write; none holds a generated word (checked).
SENTENCES = [
    "您好，我的订单号是20240518001，快递三天了还没到，请帮我查一下物流状态，谢谢！",
    "请问这款绿茶还有货吗？我想买两盒送人，能帮忙包装一下吗？",
    "Can I return the green tea if the box is already opened?",
    "已经拆封了还能退吗？质量没有问题，只是口味不太喜欢。",
    "退款审核通过后1-3个工作日原路退回，信用卡可能需要更久。",
    "Hi, my order #A1234 hasn't arrived yet. Could you check the tracking number for me?",
    "请問這個商品還有貨嗎？寄到香港需要幾天？運費怎麼算？",
    "我收到的杯子有一个裂了🙁，可以换一个新的吗？",
    "The size chart says M fits 170cm, but the jacket is too small. How do I exchange it?",
    "发票抬头写公司名称，税号是９１３１０１１５ＭＡ１ＦＬ２３４５Ｘ，麻烦开电子发票。",
    "Thanks for the quick reply 😊 I'll wait for the courier tomorrow.",
    "优惠券为什么用不了？页面显示满199减30，我买了215元的东西。",
    "會員積分可以抵扣現金嗎？上次的積分好像沒有到帳。",
    "Is there a discount if I buy ten boxes for our office? We need them before Friday.",
    "你们的客服电话一直占线，能不能在这里帮我改一下收货地址？",
    "新地址是上海市浦东新区张江路88号3栋1201室，收件人不变。",
    "Do you ship to Singapore? What payment methods do you accept: PayPal, Visa, Alipay?",
    "这个充电宝能带上飞机吗？容量是多少毫安？",
    "The app keeps logging me out when I open my cart, on Android 14.",
    "麻烦尽快处理，明天是我妈妈的生日，想当天送到。谢谢！！",
    "您好！已为您查询：包裹目前在上海转运中心，预计明天送达。",
    "Opened food items can be returned within 7 days if the quality is at fault.",
    "如有其他问题请随时联系我们，祝您购物愉快～",
    "非常抱歉给您带来不便，我们会为您补发一件新的商品，运费由我们承担。",
    "Your refund of ¥89.00 has been issued and should reach your card in 3-5 business days.",
]
# Listed words planted in one message in twenty, written plainly or with evasions.
PLANTED = [
    ("fraud", "刷单返利", ["刷单返利", "刷*单*返*利", "刷單返利", "刷 单 返 利"]),
    ("fraud", "网络赌博", ["网络赌博", "網絡賭博", "网🙂络赌博"]),
    ("contact_leak", "加微信", ["加微信", "加\u200b微\u200b信", "加·微·信"]),
    ("fraud", "fake invoice", ["fake invoice", "FAKE-INVOICE", "ｆａｋｅ ｉｎｖｏｉｃｅ"]),
]
HAN = ("的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后"
       "小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民"
       "样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打"
       "便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才"
       "场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲")
CATEGORIES = (("abuse", Action.MASK), ("contact_leak", Action.REVIEW), ("fraud", Action.BLOCK),
              ("spam", Action.MASK))


def build_corpus(rng: random.Random, count: int, low: int, high: int, *, plant: bool = True) -> list[str]:
    """Messages of `low`..`high` characters made of whole sentences, one in twenty with a listed word."""
    messages = []
    for n in range(count):
        target = rng.randint(low, high)
        parts: list[str] = []
        while sum(map(len, parts)) < target:
            parts.append(rng.choice(SENTENCES))
        if plant and n % 20 == 7:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(rng.choice(PLANTED)[2]))
        messages.append("".join(parts)[:target])
    return messages


def write_lexicon(folder: Path, rng: random.Random, words: int) -> None:
    """`words` synthetic words in four categories, none found in the sample sentences."""
    corpus = normalize("".join(SENTENCES)).text
    chosen: set[str] = set()
    while len(chosen) < words - len(PLANTED):
        if rng.random() < 0.8:
            word = "".join(rng.choice(HAN) for _ in range(rng.choice((2, 3, 3, 4, 4))))
        else:
            word = " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9)))
                            for _ in range(rng.choice((1, 1, 2))))
        if normalize(word).text not in corpus:
            chosen.add(word)
    listed = sorted(chosen)
    rng.shuffle(listed)
    folder.mkdir(parents=True, exist_ok=True)
    share = len(listed) // len(CATEGORIES)
    for index, (name, action) in enumerate(CATEGORIES):
        planted = [word for category, word, _ in PLANTED if category == name]
        body = listed[index * share:(index + 1) * share] + planted
        (folder / f"{name}.txt").write_text(f"# action: {action.name.lower()}\n" + "\n".join(body) + "\n",
                                            encoding="utf-8")
    whitelist = [w + rng.choice(HAN) for w in listed[:200] if not w.isascii()]
    (folder / "whitelist.txt").write_text("\n".join(whitelist) + "\n", encoding="utf-8")
