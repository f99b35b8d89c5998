#!/usr/bin/env python3
"""CPU seconds a job costs the server with PREVIEW=taesd, with and without someone watching.

Starts `sdserve serve` on a model (default: the tiny test model tiny-b) with PREVIEW=taesd,
then runs the same job (new seed each time) alternately as `/generate` (nobody can see its
previews: none are made) and as `/jobs` followed over `GET /jobs/{id}/events` (its previews are
made and sent), and reads the server's user+sys CPU time from /proc around each job. Prints the
medians and the difference: the CPU a job without a watcher no longer spends on previews.

    tools/preview_cpu.py [--binary target/debug/sdserve] [--model DIR] [--taesd DIR]
                         [--jobs 5] [--steps 20] [--size 256] [--every 5]
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates/pipeline/tests/fixtures")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post(port, path, body):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    assert r.status in (200, 202), (r.status, data[:300])
    return json.loads(data)


def follow(port, job_id):
    """Reads the job's event stream to its end: the number of previews received."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("GET", f"/jobs/{job_id}/events")
    r = c.getresponse()
    previews, last = 0, None
    for line in r:
        if line.startswith(b"event:"):
            last = line[6:].strip().decode()
            previews += last == "preview"
    assert last == "succeeded", last
    return previews


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/debug/sdserve"))
    ap.add_argument("--model", default=os.path.join(FIXTURES, "tiny-b"))
    ap.add_argument("--taesd", default=os.path.join(FIXTURES, "taesd/taesd-a"))
    ap.add_argument("--jobs", type=int, default=5, help="jobs of each kind")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--every", type=int, default=5, help="PREVIEW_EVERY")
    a = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tempfile.mkdtemp(prefix="sdserve-preview-cpu-")
    env = dict(os.environ, PORT=str(port), MODEL_ID=a.model, MODEL_CACHE_DIR=cache,
               PREVIEW="taesd", PREVIEW_TAESD=a.taesd, PREVIEW_EVERY=str(a.every),
               RESPONSE_CACHE_MB="0", GENERATION_TIMEOUT_SECONDS="600", LOG_LEVEL="warn")
    server = subprocess.Popen([a.binary, "serve"], env=env, stdout=subprocess.DEVNULL)
    try:
        t = time.time()
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.time() - t < 300 and server.poll() is None, "the server did not start"
            time.sleep(0.2)
        time.sleep(2)  # the TAESD loads after the model

        def job(seed):
            return {"prompt": "a lighthouse at dawn", "steps": a.steps, "width": a.size,
                    "height": a.size, "seed": seed}

        post(port, "/generate", job(0))  # warm-up
        unwatched, watched, received = [], [], []
        for i in range(a.jobs):
            before = cpu_seconds(server.pid)
            post(port, "/generate", job(2 * i + 1))
            unwatched.append(cpu_seconds(server.pid) - before)
            before = cpu_seconds(server.pid)
            job_id = post(port, "/jobs", job(2 * i + 2))["id"]
            received.append(follow(port, job_id))
            watched.append(cpu_seconds(server.pid) - before)
        u, w = statistics.median(unwatched), statistics.median(watched)
        print(f"model {os.path.basename(a.model)}, {a.size}x{a.size}, {a.steps} steps, "
              f"PREVIEW=taesd every {a.every}; {a.jobs} jobs each, server CPU user+sys seconds; "
              f"load average before: {os.getloadavg()[0]:.1f}")
        print(f"  /generate (no watcher, no preview): median {u:.3f} s  {['%.3f' % x for x in unwatched]}")
        print(f"  /jobs + event stream ({statistics.median(received):.0f} previews): "
              f"median {w:.3f} s  {['%.3f' % x for x in watched]}")
        print(f"  saved per unwatched job: {w - u:.3f} CPU-s ({(w - u) / w * 100:.0f}% of a watched job)")
    finally:
        server.terminate()
        server.wait(timeout=30)
        subprocess.run(["rm", "-rf", cache])


if __name__ == "__main__":
    sys.exit(main())
