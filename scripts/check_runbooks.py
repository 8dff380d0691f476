#!/usr/bin/env python3
"""Operator documentation names only real things (run by scripts/test.sh).

- every alert's runbook_url points to an existing file and heading in docs/;
- every metric (`eventflow_...`) named in docs/, README.md or the alert rules is registered by the
  code (histogram suffixes _bucket/_sum/_count allowed);
- every alert name (`Eventflow...`) named in docs/ exists in deploy/prometheus/rules.yml;
- every `eventflow <subcommand>` named in docs/ or README.md is a subcommand of the binary.
"""
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

# Names the code defines.
code = "\n".join(p.read_text() for p in (repo / "pipeline").rglob("*.rs"))
metrics = set(re.findall(r'"(eventflow_[a-z0-9_]+)"', code))
main = (repo / "pipeline/cli/src/main.rs").read_text()
command_enum = main[main.index("enum Command") :]
command_enum = command_enum[: command_enum.index("\n}\n")]
variants = re.findall(r"^    ([A-Z][A-Za-z]+)\b", command_enum, re.M)
subcommands = {re.sub(r"(?<!^)([A-Z])", r"-\1", v).lower() for v in variants}
alert_names = set(alerts)

docs = sorted((repo / "docs").rglob("*.md")) + [repo / "README.md"]
checked = {"metrics": 0, "alerts": 0, "commands": 0}
for doc in docs + [repo / "deploy/prometheus/rules.yml"]:
    text = doc.read_text()
    where = doc.relative_to(repo)
    for name in set(re.findall(r"\beventflow_[a-z0-9_]*[a-z0-9]", text)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        checked["metrics"] += 1
        if name not in metrics and base not in metrics:
            bad.append(f"{where}: metric {name} is not registered by the code")
    if doc.suffix != ".md":
        continue
    for name in set(re.findall(r"\b(Eventflow[A-Z][A-Za-z]+)\b", text)):
        checked["alerts"] += 1
        if name not in alert_names:
            bad.append(f"{where}: alert {name} is not in deploy/prometheus/rules.yml")
    for cmd in set(re.findall(r"`eventflow ([a-z][a-z-]*)", text)):
        checked["commands"] += 1
        if cmd not in subcommands:
            bad.append(f"{where}: `eventflow {cmd}` is not a subcommand ({sorted(subcommands)})")

if bad:
    sys.exit("\n".join(bad))
print(
    f"{len(urls)} runbook links resolve to docs/ headings; {checked['metrics']} metric, "
    f"{checked['alerts']} alert and {checked['commands']} command mentions are real"
)
