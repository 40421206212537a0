"""Time the dashboard in headless Chromium over the DevTools protocol (real time, not virtual time).

usage: python3 ui_draw.py URL [REPEATS]

Loads URL REPEATS times in a fresh tab of Debian's `chromium` and prints one JSON line: the milliseconds
from navigation start until the page had drawn its curves (the page's own `data-first-draw-ms`), how many
series it drew, and its script-error count. Needs `websocket-client` (pip).
"""
import json, os, subprocess, sys, tempfile, time, urllib.request

import websocket

url = sys.argv[1]
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
chrome = os.environ.get("BITLLAMA_CHROMIUM", "/usr/bin/chromium")
port = 9333
profile = tempfile.mkdtemp()
proc = subprocess.Popen(
    [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
     f"--remote-debugging-port={port}", f"--remote-allow-origins=http://127.0.0.1:{port}", f"--user-data-dir={profile}", "--window-size=1400,1800", "about:blank"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(100):
        try:
            tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
            break
        except OSError:
            time.sleep(0.1)
    page = next(t for t in tabs if t["type"] == "page")
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], suppress_origin=True)
    n = 0

    def call(method, **params):
        global n
        n += 1
        ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == n:
                return msg.get("result", {})

    def body(attr):
        r = call("Runtime.evaluate", expression=f"document.body && document.body.dataset.{attr}", returnByValue=True)
        return r.get("result", {}).get("value")

    draws = []
    for _ in range(repeats):
        call("Page.navigate", url="about:blank")
        call("Page.navigate", url=url)
        t0 = time.time()
        while body("firstDrawMs") is None:
            if time.time() - t0 > 60:
                sys.exit("the page did not draw within 60 s")
            time.sleep(0.02)
        draws.append(float(body("firstDrawMs")))
    draws.sort()
    print(json.dumps({"url": url, "draw_ms_median": draws[len(draws) // 2], "draw_ms": draws,
                      "series": int(body("series")), "errors": int(body("errors"))}))
finally:
    proc.kill()
