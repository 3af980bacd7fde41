#!/usr/bin/env python3
"""The benchmark: custody with auditing on, side by side with direct and nginx.

Every scenario runs against each target in turn, on a fresh process: the canned upstream
alone (direct), nginx `proxy_pass` with upstream keepalive, a bare proxy on custody's own
HTTP stack with nothing else (`hyper`: what the stack costs before custody adds anything
to it; `hyper-affine` gives each client connection its own upstream connection on the
same task), custody with auditing on
(redaction, compression, hash chain, signed seals, default fsync policy) and custody in
`durable` mode; LiteLLM's proxy once, when installed. After each custody run custody is
stopped (SIGTERM: it drains) and its trail verified: the records in it must equal the
requests that completed, warm-up included.

Usage: tests/load/run.sh [--quick] [--only NAME] [--out FILE.json]
Standard library only; the tools it drives are built and installed by run.sh.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOAD = ROOT / "target" / "release" / "custody-load"
CUSTODY = ROOT / "target" / "release" / "custody"
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# name, what the table calls it, load generator arguments, targets
SCENARIOS = [
    ("chat-1k-c32", "chat 1 KB, saturation, 32 connections", ["--connections", "32"],
     ["direct", "nginx", "hyper", "hyper-affine", "custody", "custody-durable", "litellm"]),
    ("chat-1k-c1", "chat 1 KB, saturation, 1 connection", ["--connections", "1"],
     ["direct", "nginx", "hyper", "custody", "custody-durable"]),
    ("chat-1k-c256", "chat 1 KB, saturation, 256 connections", ["--connections", "256"],
     ["direct", "nginx", "hyper", "custody", "custody-durable"]),
    ("chat-32k-c32", "chat 32 KB, saturation, 32 connections",
     ["--connections", "32", "--prompt-bytes", "32768"],
     ["direct", "nginx", "hyper", "custody", "custody-durable"]),
    ("chat-1m-c8", "chat 1 MB, saturation, 8 connections",
     ["--connections", "8", "--prompt-bytes", "1048576"],
     ["direct", "nginx", "hyper", "custody", "custody-durable"]),
    ("chat-1k-h2", "chat 1 KB, HTTP/2, saturation, 4 connections x 8 streams",
     ["--http2", "--connections", "4", "--streams", "8"],
     ["direct", "nginx", "hyper", "custody", "custody-durable"]),
    ("chat-1k-rate1000", "chat 1 KB, 1,000 req/s, 32 connections",
     ["--connections", "32", "--rate", "1000"],
     ["direct", "nginx", "hyper", "custody", "custody-durable"]),
    ("sse-c32", "SSE, 20 chunks 10 ms apart, 32 connections",
     ["--connections", "32", "--stream"],
     ["direct", "nginx", "hyper", "custody", "custody-durable"]),
    ("conn-1000", "1,000 connections, 1,000 req/s in all",
     ["--connections", "1000", "--rate", "1000"],
     ["direct", "nginx", "custody"]),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, **kw):
    """Starts a server that prints `... http://ADDR` first; returns (process, ADDR)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **kw)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc, line.strip().rsplit("http://", 1)[1]


def wait_http(url, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def family(pid):
    """A process and its descendants (nginx's workers, LiteLLM's)."""
    kids = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def ticks(stat):
    """User + system clock ticks from a `/proc/.../stat` file; 0 once it is gone."""
    try:
        f = pathlib.Path(stat).read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except (OSError, IndexError, ValueError):
        return 0


def cpu_seconds(pids):
    return sum(ticks(f"/proc/{p}/stat") for p in pids) / TICK


def writer_seconds(pid):
    """CPU time of custody's writer thread (the audit work, off the request path)."""
    total = 0
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            if (task / "comm").read_text().strip() == "custody-writer":
                total += ticks(task / "stat")
        except OSError:
            pass
    return total / TICK


def rss_kb(pids):
    total = 0
    for p in pids:
        try:
            total += int(pathlib.Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE_KB
        except (OSError, IndexError, ValueError):
            pass
    return total


class Sampler(threading.Thread):
    """The most resident memory of a process family while the load runs."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        pids = family(self.pid)
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kb(pids))
            self.stop.wait(0.05)


def metric(admin, name):
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


class Target:
    """A running proxy (or none, for direct): where to send, what to measure."""

    def __init__(self, name, url, proc=None):
        self.name, self.url, self.proc = name, url, proc
        self.admin, self.audit_dir = None, None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nginx(work, upstream):
    port, port2 = free_port(), free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
user root;
worker_processes auto;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    client_max_body_size 16m;
    client_body_buffer_size 2m;
    keepalive_requests 1000000;
    upstream model {{
        server {upstream};
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        listen 127.0.0.1:{port2} http2 reuseport backlog=4096;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Streamed answers go out as they come, as custody's do.
            proxy_buffering off;
        }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            socket.create_connection(("127.0.0.1", port2), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    t = Target("nginx", f"127.0.0.1:{port}", proc)
    t.h2_url = f"127.0.0.1:{port2}"
    return t


def start_custody(work, upstream, name, durable):
    audit = work / f"{name}-audit"
    keys = work / "keys"
    if not (keys / "custody.key").exists():
        subprocess.run([CUSTODY, "keygen", "--out", keys], check=True, capture_output=True)
    conf = work / f"{name}.toml"
    conf.write_text(f"""
[listen]
addr = "127.0.0.1:0"

[admin]
addr = "127.0.0.1:0"

[log]
format = "text"

[audit]
dir = "{audit}"
signing_key = "{keys / 'custody.key'}"
{'durability = "durable"' if durable else ''}

[[route]]
name = "openai"
prefix = "/v1/"
upstream = "http://{upstream}"
provider = "openai"
""")
    proc = subprocess.Popen([CUSTODY, "serve", "--config", conf], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "RUST_LOG": "warn"})
    first, second = proc.stdout.readline(), proc.stdout.readline()
    if "http://" not in first or "http://" not in second:
        proc.kill()
        raise RuntimeError(f"custody did not start: {first!r} {second!r}")
    t = Target(name, first.strip().rsplit("http://", 1)[1], proc)
    t.admin = second.strip().rsplit("http://", 1)[1]
    t.audit_dir = audit
    return t


def start_litellm(work, upstream):
    port = free_port()
    conf = work / "litellm.yaml"
    conf.write_text(f"""
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://{upstream}/v1
      api_key: sk-bench
general_settings:
  # The key the load generator presents (LiteLLM refuses to start without one).
  master_key: sk-bench-00000000000000000000000000
""")
    proc = subprocess.Popen([LITELLM, "--config", conf, "--host", "127.0.0.1", "--port", str(port),
                             "--num_workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work,
                            start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness")
    return Target("litellm", f"127.0.0.1:{port}", proc)


def trail_records(audit_dir):
    """Records in a stopped custody's trail, counted by a full verify."""
    out = subprocess.run([CUSTODY, "log", "verify", "--dir", audit_dir], capture_output=True, text=True)
    m = re.search(r"records: (\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"verify failed: {out.stdout} {out.stderr}")
    return int(m.group(1))


def run_point(work, upstream, scenario, target_name, quick):
    name, _, args, _ = scenario
    if target_name == "direct":
        target = Target("direct", upstream)
    elif target_name == "nginx":
        target = start_nginx(work, upstream)
    elif target_name == "litellm":
        target = start_litellm(work, upstream)
    elif target_name in ("hyper", "hyper-affine"):
        affine = ["--affine"] if target_name == "hyper-affine" else []
        proc, addr = spawn([LOAD, "proxy", "--upstream", upstream, *affine])
        target = Target(target_name, addr, proc)
    else:
        target = start_custody(work, upstream, f"{name}-{target_name}", target_name == "custody-durable")
    url = target.url
    if "--http2" in args and getattr(target, "h2_url", None):
        url = target.h2_url
    duration, warmup = ("2", "0.5") if quick else ("10", "2")
    if target_name == "litellm":
        duration, warmup = ("5", "1") if quick else ("15", "3")
    load = [LOAD, "run", "--url", f"http://{url}/v1/chat/completions", "--duration", duration, "--warmup", warmup, *args]
    sampler = Sampler(target.proc.pid) if target.proc else None
    pids = family(target.proc.pid) if target.proc else []
    cpu0 = cpu_seconds(pids)
    writer0 = writer_seconds(target.proc.pid) if target.admin else 0
    if sampler:
        sampler.start()
    try:
        r = json.loads(subprocess.run(load, check=True, capture_output=True, text=True).stdout)
        pids = family(target.proc.pid) if target.proc else []
        r["cpu_us_per_request"] = (
            round((cpu_seconds(pids) - cpu0) * 1e6 / r["completed_all"], 1) if target.proc and r["completed_all"] else None
        )
        if sampler:
            sampler.stop.set()
            sampler.join()
            r["rss_peak_mib"] = round(sampler.peak / 1024, 1)
        if target.admin and r["completed_all"]:
            # Of the CPU per request, what the writer thread spent on its record.
            r["writer_us_per_record"] = round((writer_seconds(target.proc.pid) - writer0) * 1e6 / r["completed_all"], 1)
        if target.admin:
            r["queue_high_water"] = int(metric(target.admin, "custody_audit_queue_high_water"))
    finally:
        target.stop()
    if target.audit_dir:
        r["records"] = trail_records(target.audit_dir)
        r["records_equal_requests"] = r["records"] == r["completed_all"]
    r["target"] = target_name
    r["scenario"] = name
    return r


def fmt_us(v):
    return "-" if v is None else f"{v / 1000:.2f}"


def table(results):
    by = {}
    for r in results:
        by.setdefault(r["scenario"], {})[r["target"]] = r
    lines = []
    for name, title, args, _ in SCENARIOS:
        got = by.get(name)
        if not got:
            continue
        stream = "--stream" in args
        lines.append(f"\n**{title}**\n")
        d, n = got.get("direct"), got.get("nginx")
        if stream:
            lines.append("| target | streams/s | TTFB p50 / p99 ms | chunk gap p50 / p99 ms | latency p99 ms | CPU µs/req (writer) | RSS MiB | records = requests |")
            lines.append("|---|---|---|---|---|---|---|---|")
        else:
            lines.append("| target | req/s | vs nginx | vs direct | p50 / p99 / p99.9 ms | p99 over direct | CPU µs/req (writer) | RSS MiB | records = requests | queue high water |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for t in ("direct", "nginx", "hyper", "hyper-affine", "custody", "custody-durable", "litellm"):
            r = got.get(t)
            if not r:
                continue
            lat = r["latency_us"] or {}
            rec = "-" if "records" not in r else f"{'yes' if r['records_equal_requests'] else 'NO'} ({r['records']:,})"
            cpu = "-" if r.get("cpu_us_per_request") is None else f"{r['cpu_us_per_request']:.0f}"
            if r.get("writer_us_per_record") is not None:
                cpu += f" ({r['writer_us_per_record']:.0f})"
            rss = "-" if r.get("rss_peak_mib") is None else f"{r['rss_peak_mib']:.0f}"
            if stream:
                tt, gp = r["ttfb_us"] or {}, r["gap_us"] or {}
                lines.append(f"| {t} | {r['rps']:,.0f} | {fmt_us(tt.get('p50'))} / {fmt_us(tt.get('p99'))} | "
                             f"{fmt_us(gp.get('p50'))} / {fmt_us(gp.get('p99'))} | {fmt_us(lat.get('p99'))} | {cpu} | {rss} | {rec} |")
                continue
            vs_n = f"{r['rps'] / n['rps']:.2f}x" if n and n["rps"] else "-"
            vs_d = f"{r['rps'] / d['rps']:.2f}x" if d and d["rps"] else "-"
            over = "-"
            if d and d["latency_us"] and t != "direct" and lat:
                over = f"{(lat['p99'] - d['latency_us']['p99']) / 1000:+.2f} ms"
            hw = r.get("queue_high_water", "-")
            lines.append(f"| {t} | {r['rps']:,.0f} | {vs_n} | {vs_d} | {fmt_us(lat.get('p50'))} / {fmt_us(lat.get('p99'))} / "
                         f"{fmt_us(lat.get('p999'))} | {over} | {cpu} | {rss} | {rec} | {hw} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s per point instead of 10 (a smoke run)")
    ap.add_argument("--only", action="append", help="run only these scenarios (repeatable)")
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--targets", help="only these targets, comma-separated (direct,nginx,hyper,hyper-affine,custody,custody-durable,litellm)")
    ap.add_argument("--bin-dir", type=pathlib.Path, default=ROOT / "target" / "release",
                    help="where custody and custody-load are (CI's smoke run uses the debug build)")
    ap.add_argument("--out", type=pathlib.Path, help="also write the raw results here (JSON)")
    a = ap.parse_args()
    global LOAD, CUSTODY
    LOAD, CUSTODY = a.bin_dir / "custody-load", a.bin_dir / "custody"
    only_targets = set(a.targets.split(",")) if a.targets else None
    scenarios = [s for s in SCENARIOS if not a.only or s[0] in a.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="custody-bench-") as tmp:
        work = pathlib.Path(tmp)
        for scenario in scenarios:
            name, title, args, targets = scenario
            # SSE answers pace themselves; everything else gets them at once.
            interval = "10" if "--stream" in args else "0"
            up_proc, upstream = spawn([LOAD, "upstream", "--threads", "2", "--chunk-interval-ms", interval])
            try:
                for t in targets:
                    if t == "litellm" and (a.no_litellm or not LITELLM.exists()):
                        continue
                    if only_targets and t not in only_targets:
                        continue
                    r = run_point(work, upstream, scenario, t, a.quick)
                    results.append(r)
                    lat = r["latency_us"] or {}
                    print(f"{name:18} {t:16} {r['rps']:>10,.0f} req/s  p99 {fmt_us(lat.get('p99'))} ms  "
                          f"errors {r['errors']}  records {r.get('records', '-')}/{r['completed_all']}",
                          file=sys.stderr, flush=True)
            finally:
                up_proc.kill()
                up_proc.wait()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    head = (f"{datetime.date.today()}, {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}; "
            f"load generator, upstream and proxy on the same machine; {'quick' if a.quick else '10 s'} per point")
    print(head)
    print(table(results))
    if a.out:
        a.out.write_text(json.dumps({"machine": head, "results": results}, indent=1))
    bad = [r for r in results if r.get("records_equal_requests") is False]
    if bad:
        print(f"\nRECORDS LOST in {[(r['scenario'], r['target']) for r in bad]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
