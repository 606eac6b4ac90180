"""A standing corpus of hostile path and query values, sent percent-encoded into every route.

Each value must be refused with a 4xx problem+json and no upstream call, wherever it lands.
Add to it whenever a new kind of bad input shows up.
"""

TRAVERSAL = [
    "..",
    "../..",
    "../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "%2e%2e",
    "%2e%2e%2f",
    "..%2f..%2fetc%2fpasswd",
    "%252e%252e%252f",
    "....//....//",
    "/etc/passwd",
    "~root",
    "%c0%ae%c0%ae/",
    "file:///etc/passwd",
]
SEPARATORS = ["a/b", "a\\b", "a%2fb", "a%5cb", "a;b", "a?b", "a#b", "a%00b", "\x00", "%00"]
CONTROL = ["\r\nX-Injected: 1", "%0d%0aSet-Cookie:%20a=b", "a\tb", "\x1b[31m", "\x7f"]
NUMBERS = [
    "-1",
    "-0",
    "+1",
    "1e3",
    "0x10",
    "1.5",
    "01",
    "99999999999999999999",
    "4294967296",
    "18446744073709551616",
    "NaN",
    "Infinity",
    "١٢",
    "\uff11\uff12",  # fullwidth digits
]
UNICODE = ["ołinda", "OLINDA", "olínda", "\u202eadnilo", "\ufeffolinda", "🗺️", "z̵̢ä̸"]
OVERLONG = ["a" * 200, "9" * 300, "x" * 2000]
INJECTION = [
    "' OR 1=1 --",
    "<script>alert(1)</script>",
    "${jndi:ldap://x/a}",
    "{{7*7}}",
    "$(id)",
    "`id`",
    "http://169.254.169.254/latest/meta-data/",
    "gs://bucket/key",
    "s3://a/b",
    "https://demo.geopera.invalid/cogs/landsat7_olinda_6band_cog.tif",
]
EMPTYISH = ["", " ", "%20", "null", "undefined", "None", "*"]

VALUES = TRAVERSAL + SEPARATORS + CONTROL + NUMBERS + UNICODE + OVERLONG + INJECTION + EMPTYISH
