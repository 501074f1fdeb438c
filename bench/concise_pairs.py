#!/usr/bin/env python
"""Writes src/lowtune/assets/concise_pairs.jsonl, the built-in preference set `builtin:concise`.

    python bench/concise_pairs.py

140 everyday questions (70 English, 70 Chinese), each with a concise answer written for lowtune (chosen) and a
rambling one (rejected): the same answer wrapped in a seeded choice of filler openings, hedges and closings, the
padding chat models are often tuned away from. Both sides carry the same facts, so a model that learns the pairs
learns the style, not new knowledge.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "lowtune" / "assets" / "concise_pairs.jsonl"

EN = [
    ("What is the capital of Japan?", "Tokyo is the capital of Japan."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("Why do we need sleep?", "Sleep lets the body recover and helps the brain store memories."),
    ("How can I save money on groceries?", "Plan your meals, shop with a list and choose store brands."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn light, water and carbon dioxide into sugar and "
                                "oxygen."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 °C (212 °F) at sea level."),
    ("How do I reset a forgotten email password?", "Click \"Forgot password\" on the login page and follow the link "
                                                   "sent to your recovery address or phone."),
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea."),
    ("Who wrote \"Romeo and Juliet\"?", "William Shakespeare wrote \"Romeo and Juliet\"."),
    ("What is the speed of light?", "Light travels at about 300,000 kilometres per second."),
    ("How often should I water a cactus?", "Every two to four weeks, letting the soil dry out completely in between."),
    ("What is the main ingredient of guacamole?", "Avocado is the main ingredient of guacamole."),
    ("How do I convert Celsius to Fahrenheit?", "Multiply the Celsius value by 9/5 and add 32."),
    ("What causes rain?", "Water vapour cools into droplets in clouds, and they fall once they grow heavy enough."),
    ("What is the square root of 144?", "The square root of 144 is 12."),
    ("How long should I brush my teeth?", "Brush for two minutes, twice a day."),
    ("What language is spoken in Brazil?", "Portuguese is the main language of Brazil."),
    ("What is a good way to start learning to code?", "Pick one language, such as Python, and build small projects "
                                                      "with it."),
    ("Why is the ocean salty?", "Rivers carry minerals from rocks into the sea, and the salt stays behind when the "
                                "water evaporates."),
    ("What is the freezing point of water?", "Water freezes at 0 °C (32 °F)."),
    ("How do I make a cup of tea?", "Pour boiling water over a tea bag, let it steep for three to five minutes, then "
                                    "remove the bag."),
    ("What is the difference between weather and climate?", "Weather is the state of the air from day to day; "
                                                            "climate is its long-term average."),
    ("How many bones are in the adult human body?", "An adult human body has 206 bones."),
    ("What does CPU stand for?", "CPU stands for central processing unit."),
    ("How can I fall asleep faster?", "Keep a regular bedtime, avoid screens for an hour before bed and keep the room "
                                      "dark and cool."),
    ("What is the tallest mountain in the world?", "Mount Everest, at 8,849 metres, is the tallest mountain."),
    ("What is gravity?", "Gravity is the force that pulls masses toward each other."),
    ("How do I remove a coffee stain from a shirt?", "Rinse it with cold water, rub in a little detergent and wash "
                                                     "it as usual."),
    ("What is the plural of \"mouse\"?", "The plural of \"mouse\" is \"mice\"."),
    ("How many minutes are in a day?", "A day has 1,440 minutes."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How do I stay focused while studying?", "Work in blocks of 25 minutes with your phone out of reach."),
    ("What is inflation?", "Inflation is the general rise in prices over time."),
    ("What should I pack for a day hike?", "Water, snacks, a map, sunscreen, a rain layer and a charged phone."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("How do I politely decline an invitation?", "Thank them, say you can't make it, and wish them a good time."),
    ("What is a healthy breakfast?", "Oatmeal with fruit and nuts, or eggs with whole-grain toast."),
    ("Why do leaves change colour in autumn?", "Trees stop making green chlorophyll, which reveals the yellow and "
                                               "red pigments in the leaves."),
    ("What is the longest river in the world?", "The Nile is usually named the longest river, though some "
                                                "measurements favour the Amazon."),
    ("How do I calculate the area of a circle?", "Multiply pi by the radius squared."),
    ("What is an adjective?", "An adjective is a word that describes a noun, such as \"red\" or \"quick\"."),
    ("How many players does a football team have on the field?", "Each football team has eleven players on the "
                                                                 "field."),
    ("What is the best way to learn a new language?", "Practise a little every day and speak with native speakers "
                                                      "as early as you can."),
    ("What does DNA stand for?", "DNA stands for deoxyribonucleic acid."),
    ("How do I keep bread fresh longer?", "Keep it in a bread box, and freeze the slices you won't eat within two "
                                          "days."),
    ("What is the capital of Australia?", "Canberra is the capital of Australia."),
    ("How many hours of sleep do adults need?", "Most adults need seven to nine hours of sleep a night."),
    ("What is a haiku?", "A haiku is a three-line poem with 5, 7 and 5 syllables."),
    ("How does a rainbow form?", "Raindrops bend and reflect sunlight, splitting it into its colours."),
    ("What is 15% of 200?", "15% of 200 is 30."),
    ("How do I write a good email subject line?", "Keep it short and say exactly what the email is about."),
    ("What is the largest animal on Earth?", "The blue whale is the largest animal on Earth."),
    ("How do I clean a laptop screen?", "Wipe it gently with a dry microfibre cloth, slightly dampened with water if "
                                        "needed."),
    ("What is the main gas in the air we breathe?", "Nitrogen makes up about 78% of the air."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is a verb?", "A verb is a word for an action or a state, such as \"run\" or \"be\"."),
    ("Why is exercise good for you?", "Exercise strengthens the heart and muscles and improves mood and sleep."),
    ("What is the currency of the United Kingdom?", "The currency of the United Kingdom is the pound sterling."),
    ("How do I tie a simple knot?", "Make a loop, pass the end through it and pull tight."),
    ("What is the Pythagorean theorem?", "In a right triangle, a² + b² = c², where c is the longest side."),
    ("How long does sunlight take to reach Earth?", "Sunlight takes about eight minutes to reach Earth."),
    ("What is recycling?", "Recycling turns used materials into new products instead of throwing them away."),
    ("How can I reduce stress?", "Exercise, sleep enough, and take short breaks to breathe slowly."),
    ("What is the opposite of \"ancient\"?", "The opposite of \"ancient\" is \"modern\"."),
    ("How do I check if an egg is fresh?", "Put it in a bowl of water: a fresh egg sinks and lies flat."),
]

ZH = [
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("一周有几天？", "一周有七天。"),
    ("一天有多少小时？", "一天有24小时。"),
    ("怎样泡一杯绿茶？", "用约80℃的热水冲泡茶叶，等两三分钟即可饮用。"),
    ("地球上最大的海洋是什么？", "太平洋是地球上最大的海洋。"),
    ("为什么要多喝水？", "水帮助身体调节体温、运送养分和排出废物。"),
    ("怎样才能快速入睡？", "固定作息，睡前一小时不看手机，保持卧室安静黑暗。"),
    ("一年有多少天？", "平年有365天，闰年有366天。"),
    ("什么是光合作用？", "光合作用是植物利用光能，把二氧化碳和水变成糖和氧气的过程。"),
    ("《红楼梦》的作者是谁？", "《红楼梦》的作者是曹雪芹。"),
    ("水在多少度结冰？", "水在0摄氏度结冰。"),
    ("如何节约用电？", "随手关灯，选用节能电器，不用时拔掉插头。"),
    ("怎样用电饭锅煮米饭？", "米和水按约1比1.2放入电饭锅，按下煮饭键即可。"),
    ("成年人有多少块骨头？", "成年人有206块骨头。"),
    ("什么是通货膨胀？", "通货膨胀是物价普遍持续上涨、货币购买力下降的现象。"),
    ("怎样学好英语？", "每天坚持听说读写，多用英语和别人交流。"),
    ("一小时有多少秒？", "一小时有3600秒。"),
    ("世界上最高的山是哪座？", "珠穆朗玛峰是世界最高峰，海拔8848.86米。"),
    ("彩虹是怎么形成的？", "阳光经过雨滴折射和反射，分解成各种颜色，就形成了彩虹。"),
    ("怎样保护视力？", "看屏幕每二十分钟休息一下，向远处看二十秒，并保持光线充足。"),
    ("大熊猫吃什么？", "大熊猫主要吃竹子。"),
    ("如何去除衣服上的油渍？", "先涂一点洗洁精揉搓，再用温水清洗。"),
    ("太阳系有几大行星？", "太阳系有八大行星。"),
    ("什么是名词？", "名词是表示人、事物、地点或抽象概念的词。"),
    ("端午节吃什么？", "端午节吃粽子。"),
    ("怎样做番茄炒蛋？", "先炒熟鸡蛋盛出，再炒番茄出汁，倒回鸡蛋加盐翻炒即可。"),
    ("月亮为什么有圆缺变化？", "月球绕地球转动，我们看到它被太阳照亮的部分不断变化。"),
    ("电脑死机了怎么办？", "先等一会儿，仍无响应就长按电源键强制重启。"),
    ("孔子是哪个时期的人？", "孔子是春秋时期的人。"),
    ("怎样写好一份简历？", "简洁清楚，突出与岗位相关的经历和成果，尽量控制在一页内。"),
    ("一公斤等于多少克？", "一公斤等于1000克。"),
    ("为什么天空是蓝色的？", "空气分子对蓝光的散射比其他颜色更强，所以天空看起来是蓝色的。"),
    ("如何缓解压力？", "规律运动，保证睡眠，找信任的人聊一聊。"),
    ("中国有多少个省级行政区？", "中国有34个省级行政区。"),
    ("怎样挑选新鲜的鱼？", "看鱼眼是否清亮饱满、鱼鳃是否鲜红，按压鱼肉能否回弹。"),
    ("什么是人工智能？", "人工智能是让计算机完成通常需要人类智能的任务的技术。"),
    ("感冒了应该怎么办？", "多休息多喝水；症状严重或持续发烧，要及时就医。"),
    ("100的平方根是多少？", "100的平方根是10。"),
    ("中国最长的河流是什么？", "中国最长的河流是长江。"),
    ("如何养成早起的习惯？", "每天固定时间起床，前一晚早点睡，醒来立刻拉开窗帘。"),
    ("什么是动词？", "动词是表示动作或状态的词，比如“跑”和“是”。"),
    ("地球绕太阳转一圈要多久？", "地球绕太阳一圈大约需要一年，即365天多一点。"),
    ("怎样给手机省电？", "调低屏幕亮度，关闭不用的定位和后台应用。"),
    ("《静夜思》的作者是谁？", "《静夜思》的作者是李白。"),
    ("如何礼貌地拒绝别人？", "先表示感谢，再真诚地说明自己不方便。"),
    ("一年有几个季节？", "一年有四个季节：春、夏、秋、冬。"),
    ("铁为什么会生锈？", "铁与空气中的氧气和水发生反应，就会生锈。"),
    ("怎样记住英语单词？", "把单词放在句子里记，并按间隔重复复习。"),
    ("什么是二氧化碳？", "二氧化碳是由一个碳原子和两个氧原子组成的气体，化学式为CO2。"),
    ("如何保持房间整洁？", "东西用完放回原处，每天花十分钟收拾一下。"),
    ("中秋节有什么习俗？", "中秋节有赏月、吃月饼和家人团聚的习俗。"),
    ("三角形的内角和是多少度？", "三角形的内角和是180度。"),
    ("怎样安全地过马路？", "走斑马线，看清红绿灯，左右确认没有车辆后再通过。"),
    ("鲸鱼是鱼吗？", "不是，鲸鱼是哺乳动物。"),
    ("如何提高写作水平？", "多读好文章，坚持每天写一点，写完认真修改。"),
    ("人为什么要睡觉？", "睡眠让身体恢复，也帮助大脑整理记忆。"),
    ("一米等于多少厘米？", "一米等于100厘米。"),
    ("怎样冲一杯咖啡？", "用约92℃的热水冲泡或滴滤研磨好的咖啡粉即可。"),
    ("为什么先看到闪电后听到雷声？", "因为光的传播速度远比声音快。"),
    ("什么是形容词？", "形容词是描述人或事物性质、状态的词，比如“红”和“快”。"),
    ("春节是哪一天？", "春节是农历正月初一。"),
    ("怎样预防近视？", "保持正确的读写姿势，多到户外活动，控制连续用眼的时间。"),
    ("世界上最大的热沙漠是哪个？", "撒哈拉沙漠是世界上最大的热沙漠。"),
    ("如何做好时间管理？", "列出待办事项，先做重要的事，并给每件事设定完成时间。"),
    ("一打是多少个？", "一打是12个。"),
    ("为什么要垃圾分类？", "垃圾分类便于回收利用资源，也能减少污染。"),
    ("怎样判断西瓜熟没熟？", "轻拍西瓜，发出低沉的“嘭嘭”声一般就熟了。"),
    ("什么是GDP？", "GDP是国内生产总值，即一个国家一年内生产的最终产品和服务的总价值。"),
    ("标准大气压下水的沸点是多少？", "标准大气压下，水的沸点是100摄氏度。"),
    ("怎样开始跑步锻炼？", "从每次二三十分钟的慢跑开始，跑走结合，每周三次，再逐渐加量。"),
]

FILLER = {
    "en": {
        "open": ["That's a really great question, and it's one that a lot of people wonder about at some point.",
                 "Thank you so much for asking! Before I answer, let me say that this topic has many interesting "
                 "sides to it.",
                 "Great question! There are quite a few things to consider here, so let me walk you through it step "
                 "by step.",
                 "Well, this is something that comes up quite often, and I'm more than happy to help you with it.",
                 "Absolutely, I'd be glad to help with that. It's worth taking a moment to think the question "
                 "through first.",
                 "Okay, so, this is actually a very interesting topic, and there's a bit of background that might be "
                 "useful."],
        "middle": ["To give you the most helpful answer, it's important to look at the question from a few "
                   "different angles.",
                   "Of course, people have different experiences with this, and it can depend on many factors.",
                   "Generally speaking, and keeping in mind that every situation is a little bit different, there "
                   "is a fairly simple answer."],
        "lead": ["In short, here is the answer: ", "So, to put it simply: ", "The main thing to know is this: "],
        "close": ["I hope this helps! Let me know if you have any other questions, I'm always happy to explain "
                  "more.",
                  "Of course, there is much more that could be said about this, so feel free to ask if you'd like "
                  "more details.",
                  "I hope that clears things up a little. If anything is unclear, don't hesitate to ask me again!",
                  "So, to sum it all up once more: {answer} I hope this was useful to you!"],
    },
    "zh": {
        "open": ["这是一个非常好的问题，很多人在生活中都会有类似的疑问。",
                 "谢谢你的提问！在回答之前，我想先说明一下，这个话题其实有很多值得探讨的方面。",
                 "好的，我很乐意帮你解答这个问题。不过在回答之前，我们不妨先仔细想一想。",
                 "嗯，这个问题其实挺有意思的，背后有不少相关的知识可以聊一聊。"],
        "middle": ["为了给你一个尽可能全面的回答，我们需要从几个不同的角度来看这个问题。",
                   "当然，每个人的情况都不太一样，具体还要看很多因素。",
                   "一般来说，在考虑了各种各样的情况之后，答案其实并不复杂。"],
        "lead": ["简单来说，答案是：", "总的来说就是：", "最重要的一点是："],
        "close": ["希望这个回答对你有帮助！如果还有其他问题，随时可以问我，我很乐意为你详细解释。",
                  "当然，关于这个话题还有很多可以展开的内容，如果你想了解更多细节，欢迎继续提问。",
                  "希望我的解释能让你更清楚一些。如有不明白的地方，请不要犹豫，再问我一次！",
                  "所以，再总结一遍：{answer}希望对你有用！"],
    },
}


def rambling(answer: str, lang: str, rng: random.Random) -> str:
    """The same answer inside filler: an opening, a hedge, a lead-in and a closing, chosen by `rng`."""
    pool = FILLER[lang]
    sep = " " if lang == "en" else ""
    parts = [rng.choice(pool["open"]), rng.choice(pool["middle"]), rng.choice(pool["lead"]) + answer,
             rng.choice(pool["close"]).format(answer=answer)]
    return sep.join(parts)


def pairs(seed: int = 17) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for lang, items in (("en", EN), ("zh", ZH)):
        for question, answer in items:
            out.append({"prompt": [{"role": "user", "content": question}],
                        "chosen": [{"role": "assistant", "content": answer}],
                        "rejected": [{"role": "assistant", "content": rambling(answer, lang, rng)}]})
    random.Random(seed).shuffle(out)  # zh and en mixed, so any held-out fraction has both
    return out


if __name__ == "__main__":
    rows = pairs()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {OUT} ({len(rows)} pairs)")
