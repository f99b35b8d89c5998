#!/usr/bin/env python3
"""What watching LORA_DIR costs the server (README "Prompts, LoRA and embeddings").

Starts `sdserve serve` on the tiny test model twice, without LORA_DIR and with a folder of N
small LoRA files, and reads the server's user+sys CPU time from /proc: while idle for 30 s (the
worker looks at the folder every second), per cached `/generate` (each request looks at the
folder before it is checked and cached), and per forced re-read (`POST /adapters/refresh`).

    tools/adapter_folder_cost.py [N files, default 200]   (needs `requests`; SDSERVE_BIN)
"""
import json, os, shutil, subprocess, sys, tempfile, threading, time
import requests
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.environ.get("SDSERVE_BIN", ROOT + "/target/debug/sdserve")
FIX = ROOT + "/crates/pipeline/tests/fixtures"
TICK = os.sysconf("SC_CLK_TCK")

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK

def start(lora_dir):
    env = {"PATH": os.environ["PATH"], "HOST": "127.0.0.1", "PORT": "0", "LOG_FORMAT": "json",
           "MODEL_ID": FIX + "/tiny-a-vae8", "GENERATION_TIMEOUT_SECONDS": "120"}
    if lora_dir:
        env["LORA_DIR"] = lora_dir
    p = subprocess.Popen([BIN, "serve"], env=env, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if '"listening' in line:
            addr = json.loads(line)["addr"]; break
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
    url = "http://" + addr
    while requests.get(url + "/health").status_code != 200:
        time.sleep(0.1)
    return p, url

n_files = int(sys.argv[1]) if len(sys.argv) > 1 else 200
d = tempfile.mkdtemp()
src = open(FIX + "/adapters/loras/te_kohya.safetensors", "rb").read()
for i in range(n_files):
    open(f"{d}/l{i:04d}.safetensors", "wb").write(src)
body = {"prompt": "a red house", "steps": 3, "width": 256, "height": 256, "seed": 5, "scheduler": "euler"}
for label, ld in [("no LORA_DIR", None), (f"LORA_DIR {n_files} files", d)]:
    p, url = start(ld)
    s = requests.Session()
    assert s.post(url + "/generate", json=body).status_code == 200
    time.sleep(8)  # past the speed probe
    c0 = cpu(p.pid); time.sleep(30); idle = cpu(p.pid) - c0
    N = 1000
    c0 = cpu(p.pid); t0 = time.time()
    for _ in range(N):
        r = s.post(url + "/generate", json=body); assert r.headers.get("x-cache") == "hit"
    per = (cpu(p.pid) - c0) / N; wall = (time.time() - t0) / N
    line = f"{label}: idle 30 s = {idle:.2f} CPU-s; cached /generate: {per*1000:.3f} server CPU-ms/request, {wall*1000:.2f} ms wall"
    if ld:
        c0 = cpu(p.pid); t0 = time.time()
        for _ in range(5):
            r = s.post(url + "/adapters/refresh"); assert r.status_code == 200, r.text
        line += f"; forced re-read (POST /adapters/refresh): {(cpu(p.pid)-c0)/5*1000:.1f} CPU-ms, {(time.time()-t0)/5*1000:.1f} ms wall each"
    print(line, flush=True)
    p.terminate(); p.wait()
shutil.rmtree(d)
