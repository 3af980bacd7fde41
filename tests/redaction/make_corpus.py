#!/usr/bin/env python3
"""Writes corpus.jsonl: the labeled redaction corpus, deterministic (seeded).

Each line is {"text": ..., "entities": [[ENTITY, exact substring], ...]}; a line with no
entities is a hard negative that must come through untouched. Values are generated in
the real formats (valid checksums, real lengths, real groupings) and embedded in prose,
chat JSON and log lines; hand-written tricky cases come first.

    python3 tests/redaction/make_corpus.py > tests/redaction/corpus.jsonl
"""

import base64
import json
import random
import string

R = random.Random(20261129)

FIRST = ["jane", "john", "maria", "li", "ahmed", "sofia", "lukas", "chloe", "raj", "olga", "kenji", "amara", "noah", "emma"]
LAST = ["doe", "smith", "garcia", "wang", "khan", "rossi", "muller", "martin", "patel", "ivanova", "tanaka", "okafor"]
DOMAINS = ["example.com", "example.org", "mail.example.co.uk", "corp.example.net", "uni.example.edu", "example.io", "example.de", "sub.example.com.au"]
WORDS = "the quick report shows revenue grew while costs fell please review summary draft before friday meeting with team about project timeline and budget".split()


def word(n):
    return " ".join(R.choice(WORDS) for _ in range(n))


def luhn_complete(prefix, length):
    digits = [int(c) for c in prefix]
    while len(digits) < length - 1:
        digits.append(R.randrange(10))
    for check in range(10):
        cand = digits + [check]
        s = 0
        for i, d in enumerate(reversed(cand)):
            if i % 2 == 1:
                d *= 2
                if d > 9:
                    d -= 9
            s += d
        if s % 10 == 0:
            return "".join(map(str, cand))
    raise AssertionError


def luhn_ok(num):
    s = 0
    for i, ch in enumerate(reversed(num)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        s += d
    return s % 10 == 0


def card():
    kind = R.choice(["visa", "visa", "mc", "mc2", "amex", "discover", "jcb", "diners"])
    if kind == "visa":
        n, groups = luhn_complete("4", 16), [4, 4, 4, 4]
    elif kind == "mc":
        n, groups = luhn_complete(str(R.randint(51, 55)), 16), [4, 4, 4, 4]
    elif kind == "mc2":
        n, groups = luhn_complete(str(R.randint(2221, 2720)), 16), [4, 4, 4, 4]
    elif kind == "amex":
        n, groups = luhn_complete(R.choice(["34", "37"]), 15), [4, 6, 5]
    elif kind == "discover":
        n, groups = luhn_complete("6011", 16), [4, 4, 4, 4]
    elif kind == "jcb":
        n, groups = luhn_complete("35" + str(R.randint(28, 89)), 16), [4, 4, 4, 4]
    else:
        n, groups = luhn_complete(R.choice(["36", "38"]), 14), [4, 6, 4]
    sep = R.choice(["", " ", "-", " "])
    if not sep:
        return n
    out, i = [], 0
    for g in groups:
        out.append(n[i:i + g])
        i += g
    return sep.join(out)


def ssn():
    while True:
        area = R.randint(1, 899)
        if area != 666:
            break
    group, serial = R.randint(1, 99), R.randint(1, 9999)
    sep = R.choice(["-", "-", " "])
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"


def nanp_parts():
    area = f"{R.randint(2, 9)}{R.randint(0, 9)}{R.randint(0, 9)}"
    while area[1:] == "11":
        area = f"{R.randint(2, 9)}{R.randint(0, 9)}{R.randint(0, 9)}"
    exch = f"{R.randint(2, 9)}{R.randint(0, 9)}{R.randint(0, 9)}"
    while exch[1:] == "11":
        exch = f"{R.randint(2, 9)}{R.randint(0, 9)}{R.randint(0, 9)}"
    return area, exch, f"{R.randint(0, 9999):04d}"


def phone():
    a, e, l = nanp_parts()
    fmt = R.randrange(12)
    if fmt == 0:
        return f"({a}) {e}-{l}"
    if fmt == 1:
        return f"{a}-{e}-{l}"
    if fmt == 2:
        return f"{a}.{e}.{l}"
    if fmt == 3:
        return f"{a} {e} {l}"
    if fmt == 4:
        return f"+1 {a} {e} {l}"
    if fmt == 5:
        return f"+1-{a}-{e}-{l}"
    if fmt == 6:
        return f"1-{a}-{e}-{l}"
    if fmt == 7:
        return f"+1 ({a}) {e}-{l}"
    if fmt == 8:
        return R.choice(["+44 20 7946 0", "+44 161 496 0"]) + f"{R.randint(0, 999):03d}"
    if fmt == 9:
        return R.choice(["+49 30 ", "+33 1 ", "+61 2 ", "+81 3-", "+91 98"]) + f"{R.randint(1000, 9999)} {R.randint(1000, 9999)}"
    if fmt == 10:
        return f"+{R.choice(['34', '39', '31', '46'])}{R.randint(600000000, 699999999)}"
    return R.choice(["020 7946 ", "0161 496 ", "030 9018 ", "089 1234 "]) + f"{R.randint(1000, 9999)}"


IBAN_SPECS = {"DE": "n18", "GB": "a4n14", "FR": "n23", "ES": "n20", "NL": "a4n10", "IT": "a1n22", "CH": "n17", "BE": "n12", "AT": "n16", "PL": "n24"}


def iban():
    cc = R.choice(list(IBAN_SPECS))
    spec = IBAN_SPECS[cc]
    bban = ""
    i = 0
    while i < len(spec):
        kind = spec[i]
        j = i + 1
        while j < len(spec) and spec[j].isdigit():
            j += 1
        count = int(spec[i + 1:j])
        pool = string.ascii_uppercase if kind == "a" else string.digits
        bban += "".join(R.choice(pool) for _ in range(count))
        i = j
    def num(s):
        return "".join(str(int(c, 36)) for c in s)
    check = 98 - int(num(bban + cc + "00")) % 97
    full = f"{cc}{check:02d}{bban}"
    if R.random() < 0.5:
        return " ".join(full[i:i + 4] for i in range(0, len(full), 4))
    return full


def ip():
    kind = R.randrange(4)
    if kind == 0:
        return f"10.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}"
    if kind == 1:
        return f"192.168.{R.randint(0, 255)}.{R.randint(1, 254)}"
    if kind == 2:
        return f"172.{R.randint(16, 31)}.{R.randint(0, 255)}.{R.randint(1, 254)}"
    return f"{R.randint(1, 223)}.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}"


def email():
    f, l = R.choice(FIRST), R.choice(LAST)
    local = R.choice([f"{f}.{l}", f"{f}{R.randint(1, 99)}", f"{f}+{R.choice(['news', 'work', 'x'])}", f"{f[0]}_{l}", f"{f.capitalize()}.{l.capitalize()}"])
    return f"{local}@{R.choice(DOMAINS)}"


def rand(pool, n):
    return "".join(R.choice(pool) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
TOKEN = ALNUM + "_-"


def b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def with_digit(s):
    return s if any(c.isdigit() for c in s) else s[:-1] + str(R.randint(0, 9))


def secret():
    kind = R.randrange(17)
    if kind == 0:
        return "OPENAI_API_KEY", "sk-proj-" + with_digit(rand(TOKEN, R.choice([48, 64, 120])))
    if kind == 1:
        return "OPENAI_API_KEY", "sk-" + with_digit(rand(ALNUM, 48))
    if kind == 2:
        return "ANTHROPIC_API_KEY", "sk-ant-api03-" + rand(TOKEN, 93) + "AA"
    if kind == 3:
        return "AWS_ACCESS_KEY", R.choice(["AKIA", "ASIA"]) + rand(string.ascii_uppercase + string.digits, 16)
    if kind == 4:
        return "GITHUB_TOKEN", R.choice(["ghp_", "gho_", "ghs_"]) + rand(ALNUM, 36)
    if kind == 5:
        return "GITHUB_TOKEN", "github_pat_" + rand(ALNUM, 22) + "_" + rand(ALNUM, 59)
    if kind == 6:
        return "SLACK_TOKEN", R.choice(["xoxb-", "xoxp-"]) + f"{R.randint(10**10, 10**11)}-{R.randint(10**10, 10**11)}-" + rand(ALNUM, 24)
    if kind == 7:
        return "STRIPE_KEY", R.choice(["sk_live_", "rk_live_", "sk_test_"]) + rand(ALNUM, R.choice([24, 99]))
    if kind == 8:
        return "GOOGLE_API_KEY", "AIza" + rand(TOKEN, 35)
    if kind == 9:
        return "HUGGINGFACE_TOKEN", "hf_" + rand(ALNUM, 34)
    if kind == 10:
        return "GITLAB_TOKEN", "glpat-" + rand(TOKEN, 20)
    if kind == 11:
        return "NPM_TOKEN", "npm_" + rand(ALNUM, 36)
    if kind == 12:
        return "SENDGRID_API_KEY", "SG." + rand(TOKEN, 22) + "." + rand(TOKEN, 43)
    if kind in (13, 14):
        header = b64url(json.dumps({"alg": R.choice(["HS256", "RS256"]), "typ": "JWT"}).encode())
        payload = b64url(json.dumps({"sub": str(R.randint(1, 10**9)), "name": R.choice(FIRST), "iat": 1767225600}).encode())
        sig = b64url(bytes(R.randrange(256) for _ in range(R.choice([32, 64]))))
        return "JWT", f"{header}.{payload}.{sig}"
    if kind == 15:
        return "AWS_SECRET_KEY", rand(ALNUM + "/+", 40)
    return "OPENAI_API_KEY", "sk-svcacct-" + with_digit(rand(TOKEN, 64))


def pem():
    kind = R.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
    body = "\\n".join(rand(string.ascii_letters + string.digits + "+/", 64) for _ in range(R.randint(2, 5)))
    return f"-----BEGIN {kind}-----\\n{body}\\n-----END {kind}-----"


GEN = {
    "EMAIL_ADDRESS": email,
    "PHONE_NUMBER": phone,
    "CREDIT_CARD": card,
    "US_SSN": ssn,
    "IBAN_CODE": iban,
    "IP_ADDRESS": ip,
}

PROSE = {
    "EMAIL_ADDRESS": ["You can reach me at {v} any time.", "Send the contract to {v}, thanks!", "cc: <{v}>", "mailto:{v}", "Contact {v}."],
    "PHONE_NUMBER": ["Call me on {v} after 5pm.", "My number is {v}.", "Phone: {v}", "reach the desk at {v} or by chat"],
    "CREDIT_CARD": ["Please charge my card {v}, exp 09/28.", "card number: {v}", "I paid with {v} yesterday.", "Visa {v} CVV 123"],
    "US_SSN": ["My SSN is {v}.", "social security number {v}", "SSN: {v}", "ssn={v}"],
    "IBAN_CODE": ["Wire it to {v} please.", "IBAN: {v}", "Our account is {v}, reference INV-2291."],
    "IP_ADDRESS": ["The server at {v} keeps timing out.", "client={v} status=502", "ssh admin@{v} failed", "blocked {v}:443"],
}


def entity_line():
    n = R.choice([1, 1, 1, 2, 2, 3])
    parts, ents = [], []
    for _ in range(n):
        e = R.choice(list(GEN) + ["SECRET", "SECRET"])
        if e == "SECRET":
            ent, v = secret()
            if ent == "AWS_SECRET_KEY":
                parts.append(R.choice(["aws_secret_access_key = {v}", "AWS_SECRET_ACCESS_KEY={v}", "\"SecretAccessKey\": \"{v}\""]).format(v=v))
            else:
                parts.append(R.choice(["here is my key {v} can you debug?", "export TOKEN={v}", "Authorization: Bearer {v}", "token: '{v}'", "{v}"]).format(v=v))
            ents.append([ent, v])
        else:
            v = GEN[e]()
            if e == "US_SSN" and " " in v:
                tmpl = "SSN {v} on file."
            else:
                tmpl = R.choice(PROSE[e])
            parts.append(tmpl.format(v=v))
            ents.append([e, v])
        if R.random() < 0.5:
            parts.append(word(R.randint(2, 8)) + ".")
    text = " ".join(parts)
    style = R.randrange(3)
    if style == 0:
        return text, ents
    if style == 1:
        return json.dumps({"role": "user", "content": text}), ents
    ts = f"2026-11-{R.randint(1, 28):02d}T{R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d}Z"
    return f"{ts} INFO req={R.randint(10**5, 10**6)} msg=\"{text}\"", ents


def pem_line():
    v = pem()
    text = json.dumps({"role": "user", "content": "PLACEHOLDER"}).replace("PLACEHOLDER", "Why does this fail to load?\\n" + v + "\\nthanks")
    return text, [["PRIVATE_KEY", v]]


def uuid():
    h = "".join(R.choice("0123456789abcdef") for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"


def luhn_bad_16():
    n = luhn_complete("4", 16)
    last = (int(n[-1]) + R.randint(1, 9)) % 10
    n = n[:-1] + str(last)
    return " ".join(n[i:i + 4] for i in range(0, 16, 4))


def negative_line():
    k = R.randrange(16)
    if k == 0:
        return f"Order #{R.randint(10**6, 10**9)} shipped on 2026-{R.randint(1, 12):02d}-{R.randint(1, 28):02d}."
    if k == 1:
        return f"order {luhn_complete(str(R.randint(2, 6)), 16)} is delayed"
    if k == 2:
        return f"request id {uuid()} failed after {R.randint(1, 900)} ms"
    if k == 3:
        return f"Released v{R.randint(0, 9)}.{R.randint(0, 30)}.{R.randint(0, 99)} and {R.randint(1, 20)}.{R.randint(0, 9)}.{R.randint(10000, 30000)}.{R.randint(1, 999)} on {R.randint(2020, 2026)}-{R.randint(1, 12):02d}-{R.randint(1, 28):02d}T10:00:00Z"
    if k == 4:
        return f"sha256 {rand('0123456789abcdef', 64)} md5 {rand('0123456789abcdef', 32)}"
    if k == 5:
        return f"Total: ${R.randint(1, 9)},{R.randint(100, 999)}.{R.randint(10, 99)} (was EUR {R.randint(10, 999)}.{R.randint(10, 99)}), qty {R.randint(1, 50)}"
    if k == 6:
        return f"test card {luhn_bad_16()} should be rejected"
    if k == 7:
        return R.choice(["A risk-free, task-based plan.", "We use sk-learn-style pipelines.", "ask-me-anything sessions", "The desk-based team", "try sk-1234 as a placeholder"])
    if k == 8:
        return R.choice([f"ext 555-{R.randint(100, 999):04d}", f"call 123-456-{R.randint(1000, 9999)}", "dial 000-000-0000", f"fax 1{R.randint(10**8, 10**9)}"])
    if k == 9:
        return R.choice([f"id 000-{R.randint(10, 99)}-{R.randint(1000, 9999)}", f"ref 666-{R.randint(10, 99)}-{R.randint(1000, 9999)}", f"code 9{R.randint(10, 99)}-{R.randint(10, 99)}-{R.randint(1000, 9999)}", f"zip {R.randint(10000, 99999)}-{R.randint(1000, 9999)}"])
    if k == 10:
        return R.choice([f"version {R.randint(1, 9)}.{R.randint(0, 9)}.{R.randint(0, 9)}.{R.randint(0, 9)}.{R.randint(0, 9)}", f"bad ip 256.{R.randint(0, 255)}.1.1", f"mask 1.2.3", f"OID 1.3.6.1.4.1.{R.randint(1000, 9999)}"])
    if k == 11:
        return R.choice(["ping me @jane_doe on chat", "user@localhost", "write to name at example dot com", "a@b", "@here deploy is done", "email@address"])
    if k == 12:
        return R.choice([f"population {R.randint(10**9, 9 * 10**9)}", f"tracking number {luhn_complete('5', 16)}", f"invoice {luhn_complete('3', 15)}", f"timestamp {R.randint(1700000000000, 1800000000000)}"])
    if k == 13:
        return R.choice(["AKIAexample is not a key", "ghp_short", "xoxb-1", "eyJhbGciOiJIUzI1NiJ9 alone", "hf_token_here", "glpat-short"])
    if k == 14:
        return json.dumps({"role": "assistant", "content": f"Meeting at {R.randint(1, 12)}:{R.randint(10, 59)} in room {R.randint(100, 999)}, budget {R.randint(1000, 99999)} USD."})
    return f"{word(R.randint(6, 16)).capitalize()}."


HANDWRITTEN = [
    ("Email support@example.com, or jane.doe+billing@mail.example.co.uk.", [["EMAIL_ADDRESS", "support@example.com"], ["EMAIL_ADDRESS", "jane.doe+billing@mail.example.co.uk"]]),
    ("Card 4111 1111 1111 1111 exp 12/25 cvc 123", [["CREDIT_CARD", "4111 1111 1111 1111"]]),
    ("Amex 3782 822463 10005 and Diners 3056 930902 5904", [["CREDIT_CARD", "3782 822463 10005"], ["CREDIT_CARD", "3056 930902 5904"]]),
    ("Mastercard 2223003122003222.", [["CREDIT_CARD", "2223003122003222"]]),
    ("(555) 234-5678 is fictional but well formed", [["PHONE_NUMBER", "(555) 234-5678"]]),
    ("call +1 (212) 555-0147 or +44 20 7946 0958", [["PHONE_NUMBER", "+1 (212) 555-0147"], ["PHONE_NUMBER", "+44 20 7946 0958"]]),
    ("SSN 078-05-1120 was famously misused", [["US_SSN", "078-05-1120"]]),
    ("his social security number is 219099999", [["US_SSN", "219099999"]]),
    ("IBAN GB82 WEST 1234 5698 7654 32, BIC WESTGB2L", [["IBAN_CODE", "GB82 WEST 1234 5698 7654 32"]]),
    ("DE89370400440532013000 is the classic test IBAN", [["IBAN_CODE", "DE89370400440532013000"]]),
    ("traffic from 203.0.113.7 and 198.51.100.23:8443", [["IP_ADDRESS", "203.0.113.7"], ["IP_ADDRESS", "198.51.100.23"]]),
    ('{"messages":[{"role":"user","content":"my key is sk-proj-Q1w2E3r4T5y6U7i8O9p0AaSsDdFfGgHhJjKkLl"}]}', [["OPENAI_API_KEY", "sk-proj-Q1w2E3r4T5y6U7i8O9p0AaSsDdFfGgHhJjKkLl"]]),
    ("export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", [["AWS_ACCESS_KEY", "AKIAIOSFODNN7EXAMPLE"]]),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", [["AWS_SECRET_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]]),
    ("version 1.2.3, build 2026.11.29, uuid 9b2c1f0e-5d4a-4c3b-9a8f-7e6d5c4b3a21", []),
    ("The risk-free rate and task-based pricing; sk-learn; ask-me-anything.", []),
    ("Order 4539 1488 0343 6467 total $12.99", [["CREDIT_CARD", "4539 1488 0343 6467"]]),
    ("tracking 4539148803436467 arrives Tuesday", []),
    ("Prices: 1,299.99 EUR; 2.5%; 10:45:00; 2026-11-29; 555-0100", []),
    ("Commit 3f9a1c2b7d, sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", []),
    ("Café owner josé.garcia@example.es paid with 4000 0566 5566 5556 — merci", [["EMAIL_ADDRESS", "josé.garcia@example.es"], ["CREDIT_CARD", "4000 0566 5566 5556"]]),
    ("名前: 田中 電話 +81 3-1234-5678 メール tanaka@example.jp", [["PHONE_NUMBER", "+81 3-1234-5678"], ["EMAIL_ADDRESS", "tanaka@example.jp"]]),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c", [["JWT", "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"]]),
    ("10.0.0.1.5 is not an address and neither is 300.1.2.3", []),
    ("Temperature 98.6, pH 7.4, ratio 3:2, score 4-1", []),
    ("my email is JOHN.SMITH@EXAMPLE.COM; alt first_last@example-mail.com;", [["EMAIL_ADDRESS", "JOHN.SMITH@EXAMPLE.COM"], ["EMAIL_ADDRESS", "first_last@example-mail.com"]]),
    ("card: 4111-1111-1111-1111. Card no. 5500 0000 0000 0004", [["CREDIT_CARD", "4111-1111-1111-1111"], ["CREDIT_CARD", "5500 0000 0000 0004"]]),
    ("tel:+14155552671, office 415 555 2671", [["PHONE_NUMBER", "+14155552671"], ["PHONE_NUMBER", "415 555 2671"]]),
    ("resolvers 8.8.8.8 and 1.1.1.1, loopback 127.0.0.1", [["IP_ADDRESS", "8.8.8.8"], ["IP_ADDRESS", "1.1.1.1"], ["IP_ADDRESS", "127.0.0.1"]]),
    ("ssn is 123 45 6789 per the form", [["US_SSN", "123 45 6789"]]),
    ("key=ghp_0123456789abcdefghijABCDEFGHIJklmnop in .env", [["GITHUB_TOKEN", "ghp_0123456789abcdefghijABCDEFGHIJklmnop"]]),
    ('{"api_key": "sk-ant-api03-R2D2C3POr2d2c3poR2D2C3POr2d2c3poR2D2C3POr2d2c3poR2D2C3POr2d2c3poR2D2C3POr2d2c3poR2D2C3POr2d2c3-AAAA"}', [["ANTHROPIC_API_KEY", "sk-ant-api03-R2D2C3POr2d2c3poR2D2C3POr2d2c3poR2D2C3POr2d2c3poR2D2C3POr2d2c3poR2D2C3POr2d2c3poR2D2C3POr2d2c3-AAAA"]]),
    ("ISBN 978-3-16-148410-0, EAN 5901234123457, SKU 4006381333931", []),
    ("coordinates 40.7128, -74.0060; GPS 51.5074 N 0.1278 W", []),
    ("Call extension 4421 or room 1204; Invoice INV-2026-0042", []),
    ("RFC 9110 section 7.6.1; epoch 1767225600; the year 2026 had 365 days", []),
    ("TAKIAMI and MASKIA are names, not keys; iPhone 15 Pro", []),
    ("192.168.1 is a prefix, 192.168.1.0/24 a network", [["IP_ADDRESS", "192.168.1.0"]]),
    ("Dial 1-800-555-0199 for support", [["PHONE_NUMBER", "1-800-555-0199"]]),
    ("Test cards like 4242 4242 4242 4242 are still card numbers", [["CREDIT_CARD", "4242 4242 4242 4242"]]),
    ("build 20261129.1, pid 44123, port 8080, exit code 137", []),
]


def main():
    lines = [(t, e) for t, e in HANDWRITTEN]
    for _ in range(900):
        lines.append(entity_line())
    for _ in range(40):
        lines.append(pem_line())
    for _ in range(500):
        lines.append((negative_line(), []))
    for text, ents in lines:
        for _, v in ents:
            assert v in text, (v, text)
        print(json.dumps({"text": text, "entities": ents}, ensure_ascii=False))


if __name__ == "__main__":
    main()
