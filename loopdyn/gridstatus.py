"""The grid's status in the report: which runs are pending, running, failed or retried.

summary.json carries it under "status" (loopdyn.coordinator.status_dict); report.html shows
it as a table above the matrix while the grid is incomplete, or when a run failed or was
retried. Matrix cells of runs not finished read "pending", "running" or "failed".
"""
from __future__ import annotations

import html

STATE_MARK = {"pending": "· pending", "running": "▸ running", "failed": "✗ failed", "done": "✓ done"}


def status_html(data: dict) -> str:
    status = data.get("status")
    if not status:
        return ""
    runs = status.get("runs", [])
    notable = [r for r in runs if r["state"] != "done" or r["retried"]]
    if status.get("complete") and not notable:
        return ""
    e = html.escape
    c = status.get("counts", {})
    head = (f"<p><b>{'Complete' if status.get('complete') else 'Partial results'}</b>: {c.get('done', 0)}/{len(runs)} "
            f"runs done, {c.get('running', 0)} running, {c.get('pending', 0)} pending, {c.get('failed', 0)} failed"
            + (f", {status['retried']} retried" if status.get("retried") else "") +
            f" — {e(status.get('launcher', ''))}; updated {e(status.get('updated', ''))}."
            + ("" if status.get("complete") else " The figures are drawn when the grid completes.") + "</p>")
    rows = []
    for r in notable:
        detail = []
        if r["state"] == "running":
            detail.append(f"on {r['host']}, step {r['steps']}/{r['total_steps']}")
        if r["reason"]:
            detail.append(r["reason"])
        if r["retried"]:
            detail.append(f"{r['attempts']} attempts")
        if r["log"]:
            detail.append(f"log: {r['log']}")
        css = "bad" if r["state"] == "failed" else ("wait" if r["state"] != "done" else "ok")
        rows.append(f"<tr><td>{e(r['name'])}</td><td class='{css}'>{e(STATE_MARK.get(r['state'], r['state']))}</td>"
                    f"<td>{e('; '.join(detail))}</td></tr>")
    table = ("<table class='status' id='status'><thead><tr><th>run</th><th>state</th><th>details</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>") if rows else ""
    return f"<h2>Grid status</h2>{head}{table}"
