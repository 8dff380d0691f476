#!/usr/bin/env python3
"""Every alert's runbook_url points to an existing file and heading in docs/ (run by scripts/test.sh)."""
import re
import sys
from pathlib import Path

repo = Path(__file__).resolve().parent.parent
rules = (repo / "deploy/prometheus/rules.yml").read_text()
urls = re.findall(r'runbook_url:\s*"?([^"\s]+)"?', rules)
alerts = re.findall(r"^\s*-\s*alert:\s*(\S+)", rules, re.M)
if len(urls) != len(alerts):
    sys.exit(f"{len(alerts)} alerts but {len(urls)} runbook_url annotations")


def anchors(md: str) -> set:
    out = set()
    for line in md.splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


bad = []
for url in urls:
    m = re.search(r"/blob/main/(docs/[^#]+)#(.+)$", url)
    if not m:
        bad.append(f"{url}: not a docs/ link with an anchor")
        continue
    path, anchor = repo / m.group(1), m.group(2)
    if not path.exists():
        bad.append(f"{url}: {m.group(1)} does not exist")
    elif anchor not in anchors(path.read_text()):
        bad.append(f"{url}: no heading #{anchor} in {m.group(1)}")
if bad:
    sys.exit("\n".join(bad))
print(f"{len(urls)} runbook links resolve to docs/ headings")
