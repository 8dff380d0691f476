#!/usr/bin/env python3
"""Prints an overview response (GET /v1/clients/{id}/statistics/overview) as a readable summary."""
import json
import sys

o = json.load(open(sys.argv[1]))
t, q, m = o["totals"], o["quality"], o["meta"]
print(f"\n=== {o['client_id']}  {o['from']} .. {o['to']}  ({o['timezone']}) ===")
print(f"visits {t['visits']}   unique sessions {t['unique_sessions']}   entries {t['entries']}"
      f" (linked {t['linked_entries']})   conversion {t['conversion_rate']:.2%}")
bp = o["by_page"]
print(f"by page: landing {bp['landing']}  webinar {bp['webinar']}  live {bp['live']}")
print("by day:  " + "  ".join(f"{d['date'][5:]}: {d['visits']}v/{d['unique_sessions']}s/{d['entries']}e"
                               for d in o["by_day"]))
print("campaigns (cid / source / medium / campaign: visits, entries):")
for c in o["campaigns"][:8]:
    print(f"  {c['cid']:<14} {c['utm_source']:<11} {c['utm_medium']:<9} {c['utm_campaign']:<15}"
          f" {c['visits']:>5} {c['entries']:>5}")
for w in o["live"]:
    print(f"live {w['webinar_id']}: peak {w['peak_concurrent']} at {w['peak_minute']}, {w['viewer_minutes']} viewer-minutes")
print(f"quality: session link rate {q['session_link_rate']:.2%}, utm missing {q['utm_missing_ratio']:.2%},"
      f" unresolved cid {q['unresolved_cid_ratio']:.2%}")
sources = sorted(set(m["data_sources"].values()))
print(f"meta: {m['response_time_ms']} ms, sources {sources}, complete up to {m['watermark']}"
      f" ({m['staleness_seconds']} s ago)")
