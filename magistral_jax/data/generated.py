"""Generated problem sets (no download): multilingual arithmetic and algebra, and small Python tasks.

Everything comes from templates and a seeded random generator, so the bundled files
(`data/bundled/*.jsonl`, written by `tools/make_datasets.py`) are reproducible byte for byte. Only
templates are translated, by hand, into the seven languages of the Magistral paper's language
reward: English, French, Spanish, Italian, German, Chinese and Russian.

Math levels: 1 one-digit addition; 2 two-digit addition and subtraction; 3 one-digit
multiplication; 4 linear equations `a x + b = c` with an integer solution. Each problem comes with
a short reasoning trace in its language (`trace`), in the Magistral format, for SFT cold starts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

LANGUAGES = ("english", "french", "spanish", "italian", "german", "chinese", "russian")

NAMES = {
    "english": ("Tom", "Anna"),
    "french": ("Marie", "Pierre"),
    "spanish": ("Juan", "Lucía"),
    "italian": ("Marco", "Giulia"),
    "german": ("Hans", "Lena"),
    "chinese": ("小明", "小红"),
    "russian": ("Иван", "Мария"),
}

# problem templates per operation and language
ADD = {
    "english": "{n} has {a} apples and gets {b} more. How many apples does {n} have now?",
    "french": "{n} a {a} pommes et en reçoit {b} de plus. Combien de pommes {n} a-t-il maintenant ?",
    "spanish": "{n} tiene {a} manzanas y recibe {b} más. ¿Cuántas manzanas tiene {n} ahora?",
    "italian": "{n} ha {a} mele e ne riceve altre {b}. Quante mele ha {n} adesso?",
    "german": "{n} hat {a} Äpfel und bekommt {b} dazu. Wie viele Äpfel hat {n} jetzt?",
    "chinese": "{n}有{a}个苹果，又得到了{b}个。{n}现在有多少个苹果？",
    "russian": "У {n} было {a} яблок, и он получил ещё {b}. Сколько яблок теперь у {n}?",
}
SUB = {
    "english": "{n} has {a} books and gives away {b}. How many books does {n} have left?",
    "french": "{n} a {a} livres et en donne {b}. Combien de livres reste-t-il à {n} ?",
    "spanish": "{n} tiene {a} libros y regala {b}. ¿Cuántos libros le quedan a {n}?",
    "italian": "{n} ha {a} libri e ne regala {b}. Quanti libri restano a {n}?",
    "german": "{n} hat {a} Bücher und verschenkt {b}. Wie viele Bücher hat {n} noch?",
    "chinese": "{n}有{a}本书，送出了{b}本。{n}还剩多少本书？",
    "russian": "У {n} было {a} книг, и он отдал {b}. Сколько книг осталось у {n}?",
}
MUL = {
    "english": "{n} buys {a} boxes with {b} pencils in each box. How many pencils does {n} buy?",
    "french": "{n} achète {a} boîtes de {b} crayons chacune. Combien de crayons {n} achète-t-il ?",
    "spanish": "{n} compra {a} cajas con {b} lápices cada una. ¿Cuántos lápices compra {n}?",
    "italian": "{n} compra {a} scatole con {b} matite ciascuna. Quante matite compra {n}?",
    "german": "{n} kauft {a} Schachteln mit je {b} Stiften. Wie viele Stifte kauft {n}?",
    "chinese": "{n}买了{a}盒铅笔，每盒有{b}支。{n}一共买了多少支铅笔？",
    "russian": "{n} покупает {a} коробок, в каждой по {b} карандашей. Сколько карандашей покупает {n}?",
}
LINEAR = {
    "english": "Solve for x: {a}x + {b} = {c}. What is the value of x?",
    "french": "Résoudre pour x : {a}x + {b} = {c}. Quelle est la valeur de x ?",
    "spanish": "Resuelve para x: {a}x + {b} = {c}. ¿Cuál es el valor de x?",
    "italian": "Risolvi per x: {a}x + {b} = {c}. Qual è il valore di x?",
    "german": "Löse nach x auf: {a}x + {b} = {c}. Welchen Wert hat x?",
    "chinese": "解方程：{a}x + {b} = {c}。x的值是多少？",
    "russian": "Решите уравнение: {a}x + {b} = {c}. Чему равно x?",
}
# reasoning steps: the arithmetic said in words
SAY_ADD = {
    "english": "I add the two numbers: {a} plus {b} makes {r}.",
    "french": "J'additionne les deux nombres : {a} plus {b} font {r}.",
    "spanish": "Sumo los dos números: {a} más {b} son {r}.",
    "italian": "Sommo i due numeri: {a} più {b} fa {r}.",
    "german": "Ich addiere die beiden Zahlen: {a} plus {b} ergibt {r}.",
    "chinese": "我把两个数相加：{a}加{b}等于{r}。",
    "russian": "Я складываю два числа: {a} плюс {b} равно {r}.",
}
SAY_SUB = {
    "english": "I subtract the second number from the first: {a} minus {b} makes {r}.",
    "french": "Je soustrais le second nombre du premier : {a} moins {b} font {r}.",
    "spanish": "Resto el segundo número del primero: {a} menos {b} son {r}.",
    "italian": "Sottraggo il secondo numero dal primo: {a} meno {b} fa {r}.",
    "german": "Ich ziehe die zweite Zahl von der ersten ab: {a} minus {b} ergibt {r}.",
    "chinese": "我用第一个数减去第二个数：{a}减{b}等于{r}。",
    "russian": "Я вычитаю второе число из первого: {a} минус {b} равно {r}.",
}
SAY_MUL = {
    "english": "I multiply the two numbers: {a} times {b} makes {r}.",
    "french": "Je multiplie les deux nombres : {a} fois {b} font {r}.",
    "spanish": "Multiplico los dos números: {a} por {b} son {r}.",
    "italian": "Moltiplico i due numeri: {a} per {b} fa {r}.",
    "german": "Ich multipliziere die beiden Zahlen: {a} mal {b} ergibt {r}.",
    "chinese": "我把两个数相乘：{a}乘{b}等于{r}。",
    "russian": "Я умножаю два числа: {a} умножить на {b} равно {r}.",
}
SAY_LINEAR = {
    "english": "First I subtract {b} from both sides: {a}x = {d}. Then I divide by {a}: x = {r}.",
    "french": "D'abord je soustrais {b} des deux côtés : {a}x = {d}. Puis je divise par {a} : x = {r}.",
    "spanish": "Primero resto {b} en ambos lados: {a}x = {d}. Luego divido entre {a}: x = {r}.",
    "italian": "Prima sottraggo {b} da entrambi i lati: {a}x = {d}. Poi divido per {a}: x = {r}.",
    "german": "Zuerst ziehe ich {b} auf beiden Seiten ab: {a}x = {d}. Dann teile ich durch {a}: x = {r}.",
    "chinese": "先在两边减去{b}：{a}x = {d}。再除以{a}：x = {r}。",
    "russian": "Сначала вычитаю {b} из обеих частей: {a}x = {d}. Затем делю на {a}: x = {r}.",
}
ANSWER = {
    "english": "The answer is \\boxed{{{r}}}.",
    "french": "La réponse est \\boxed{{{r}}}.",
    "spanish": "La respuesta es \\boxed{{{r}}}.",
    "italian": "La risposta è \\boxed{{{r}}}.",
    "german": "Die Antwort ist \\boxed{{{r}}}.",
    "chinese": "答案是\\boxed{{{r}}}。",
    "russian": "Ответ: \\boxed{{{r}}}.",
}


def math_problem(rng: random.Random, language: str, level: int) -> dict[str, Any]:
    """One problem: text, answer, and a reasoning trace (`[THINK]steps[/THINK]answer`)."""
    if language not in LANGUAGES:
        raise ValueError(f"language {language!r}: expected one of {LANGUAGES}")
    name = rng.choice(NAMES[language])
    if level == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        text, say, r = ADD[language].format(n=name, a=a, b=b), SAY_ADD[language].format(a=a, b=b, r=a + b), a + b
    elif level == 2:
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        if rng.random() < 0.5:
            text, say, r = ADD[language].format(n=name, a=a, b=b), SAY_ADD[language].format(a=a, b=b, r=a + b), a + b
        else:
            a, b = max(a, b), min(a, b)
            text, say, r = SUB[language].format(n=name, a=a, b=b), SAY_SUB[language].format(a=a, b=b, r=a - b), a - b
    elif level == 3:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text, say, r = MUL[language].format(n=name, a=a, b=b), SAY_MUL[language].format(a=a, b=b, r=a * b), a * b
    elif level == 4:
        a, x, b = rng.randint(2, 9), rng.randint(-9, 12), rng.randint(1, 30)
        c = a * x + b
        text = LINEAR[language].format(a=a, b=b, c=c)
        say, r = SAY_LINEAR[language].format(a=a, b=b, d=c - b, r=x), x
    else:
        raise ValueError(f"level {level}: expected 1 to 4")
    return {
        "problem": text,
        "answer": str(r),
        "language": language,
        "level": level,
        "trace": f"[THINK]{say}[/THINK]{ANSWER[language].format(r=r)}",
    }


def math_set(n_per_cell: int, seed: int, levels: tuple[int, ...] = (1, 2, 3, 4)) -> list[dict[str, Any]]:
    """`n_per_cell` problems for every (language, level), with ids."""
    rng = random.Random(seed)
    rows = []
    for level in levels:
        for language in LANGUAGES:
            for k in range(n_per_cell):
                row = math_problem(rng, language, level)
                rows.append({"id": f"math-{language[:2]}-{level}-{k:04d}", **row})
    return rows


# ------------------------------------------------------------------------------------------------
# Python tasks: statement, reference solution, input generator
# ------------------------------------------------------------------------------------------------


def _ints(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


CODE_TASKS: list[tuple[str, str, Callable[[random.Random], str], Callable[[str], str]]] = [
    (
        "sum-two",
        "Read two integers a and b on one line and print a + b.",
        lambda r: f"{r.randint(-1000, 1000)} {r.randint(-1000, 1000)}\n",
        lambda s: str(sum(map(int, s.split()))),
    ),
    (
        "max-list",
        "The first line holds n, the second n integers. Print the largest one.",
        lambda r: (lambda xs: f"{len(xs)}\n{' '.join(map(str, xs))}\n")(_ints(r, r.randint(1, 20), -99, 99)),
        lambda s: str(max(map(int, s.split("\n")[1].split()))),
    ),
    (
        "reverse-string",
        "Read one line and print it reversed.",
        lambda r: "".join(r.choice("abcdefghij") for _ in range(r.randint(1, 30))) + "\n",
        lambda s: s.strip("\n")[::-1],
    ),
    (
        "count-vowels",
        "Read one line of lowercase letters and print how many of them are vowels (a, e, i, o, u).",
        lambda r: "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(1, 40))) + "\n",
        lambda s: str(sum(c in "aeiou" for c in s.strip())),
    ),
    (
        "fibonacci",
        "Read n (0 <= n <= 80) and print the n-th Fibonacci number (F0 = 0, F1 = 1).",
        lambda r: f"{r.randint(0, 80)}\n",
        lambda s: (lambda n: str(_fib(n)))(int(s)),
    ),
    (
        "is-prime",
        "Read an integer n >= 2 and print YES if it is prime, NO otherwise.",
        lambda r: f"{r.randint(2, 10_000)}\n",
        lambda s: "YES" if all(int(s) % d for d in range(2, int(int(s) ** 0.5) + 1)) else "NO",
    ),
    (
        "sum-digits",
        "Read a non-negative integer and print the sum of its decimal digits.",
        lambda r: f"{r.randint(0, 10**12)}\n",
        lambda s: str(sum(map(int, s.strip()))),
    ),
    (
        "gcd",
        "Read two positive integers and print their greatest common divisor.",
        lambda r: f"{r.randint(1, 10**6)} {r.randint(1, 10**6)}\n",
        lambda s: str(_gcd(*map(int, s.split()))),
    ),
    (
        "sort-numbers",
        "The first line holds n, the second n integers. Print them sorted in increasing order, separated by spaces.",
        lambda r: (lambda xs: f"{len(xs)}\n{' '.join(map(str, xs))}\n")(_ints(r, r.randint(1, 20), -50, 50)),
        lambda s: " ".join(map(str, sorted(map(int, s.split("\n")[1].split())))),
    ),
    (
        "palindrome",
        "Read one word and print YES if it reads the same backwards, NO otherwise.",
        lambda r: (lambda w: (w + w[::-1] if r.random() < 0.5 else w) + "\n")(
            "".join(r.choice("abc") for _ in range(r.randint(1, 6)))
        ),
        lambda s: "YES" if s.strip() == s.strip()[::-1] else "NO",
    ),
    (
        "factorial",
        "Read n (0 <= n <= 20) and print n!.",
        lambda r: f"{r.randint(0, 20)}\n",
        lambda s: str(_factorial(int(s))),
    ),
    (
        "count-words",
        "Read one line and print the number of words in it (words are separated by spaces).",
        lambda r: " ".join("w" * r.randint(1, 5) for _ in range(r.randint(1, 12))) + "\n",
        lambda s: str(len(s.split())),
    ),
]


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _factorial(n: int) -> int:
    out = 1
    for k in range(2, n + 1):
        out *= k
    return out


def code_set(n_tests: int, seed: int) -> list[dict[str, Any]]:
    """The Python tasks, each with `n_tests` input/output tests from its reference solution."""
    rng = random.Random(seed)
    rows = []
    for name, statement, make_input, solve in CODE_TASKS:
        tests = []
        for _ in range(n_tests):
            given = make_input(rng)
            tests.append({"input": given, "output": solve(given) + "\n"})
        rows.append({"id": f"code-{name}", "problem": statement, "task": "code", "language": "english", "tests": tests})
    return rows
