"""parrot_pandas benchmarks: overhead, request-bound, token-bound and scale.

Run from a clone (the checkout is benchmarked, installed or not)::

    python benchmarks/run.py            # every scenario, a few minutes
    python benchmarks/run.py --quick    # smaller sizes, for iterating
    python benchmarks/run.py --only 2   # one scenario (repeat or comma-separate for more)

Every measurement runs in a fresh client process against a fresh server process
(``python -m parrot_pandas.testing``) on 127.0.0.1, so neither the server's CPU nor an earlier
measurement's memory counts against the client. The orchestrator prints a Markdown table and
the machine it ran on, and writes both to ``benchmarks/results.md``.

Internal child mode (what the orchestrator runs)::

    python benchmarks/run.py --scenario 1 --variant parrot --url http://127.0.0.1:PORT/v1

prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import json
import os
import platform
import random
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Benchmark the checkout this file belongs to, installed or not.
sys.path.insert(0, str(ROOT))

MODEL = "parrot-bench"
API_KEY = "bench-key"
CONCURRENCY = 64  # parrot_pandas' default max_concurrency; the bare loop uses the same

# Full and --quick sizes of every scenario.
SIZES = {
    "full": {"overhead_rows": 20_000, "overhead_reps": 5, "request_rows": 400,
             "token_rows": 150, "scale_rows": 100_000},
    "quick": {"overhead_rows": 1000, "overhead_reps": 1, "request_rows": 100,
              "token_rows": 40, "scale_rows": 10_000},
}  # fmt: skip

# Scenario 2 and 3 server settings (fixed, so results compare across runs).
REQUEST_RPM = 1200
TOKEN_TPM = 600_000
LIMITED_LATENCY = 0.2
TOKEN_PROMPT_CHARS = 5200  # ~1.3k tokens at the server's 4 characters a token
TOKEN_MAX_TOKENS = 16
SCALE_DOC_CHARS = 1024

TARGETS = {
    "overhead_ratio": 1.3,
    # Issue 12: the whole client process (interpreter, imports and the run) against a whole
    # process that runs the bare aiohttp loop.
    "process_ratio": 1.15,
    "wall_over_floor": 1.05,
    "share_429": 0.02,
    "scale_rss_mb": 1024,
}


# ------------------------------------------------------------------------------ inputs


def _corpus(chars: int, seed: int = 7) -> str:
    """Deterministic word salad to cut distinct documents from."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(2000)
    ]
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def documents(rows: int, chars: int, *, seed: int = 7) -> list[str]:
    """``rows`` distinct texts of exactly ``chars`` characters (a row number, then words)."""
    corpus = _corpus(max(200_000, chars * 4), seed)
    span = len(corpus) - chars
    docs = []
    for i in range(rows):
        head = f"Document {i}. "
        start = (i * 7919) % span
        docs.append(head + corpus[start : start + chars - len(head)])
    return docs


def short_texts(rows: int) -> list[str]:
    return [f"Row {i}: the quick brown fox jumps over the lazy dog." for i in range(rows)]


def server_tokens(text: str) -> int:
    """Tokens the fake server charges for a message: four characters a token, rounded up."""
    return -(-len(text) // 4)


# ------------------------------------------------------------------------------ child side


def _post_json(url: str) -> dict[str, Any]:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def _generate(df: Any, url: str, **options: Any) -> Any:
    return df.llm.generate(
        "${text}", base_url=url, api_key=API_KEY, model=MODEL, progress=False, **options
    )


async def _bare_loop(url: str, texts: Sequence[str], concurrency: int) -> list[str]:
    """The baseline: one aiohttp session, a worker pool, the same payloads, json parsing."""
    import aiohttp

    endpoint = url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    results: list[str] = [""] * len(texts)
    feed = iter(enumerate(texts))
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for i, text in feed:
                payload = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
                async with session.post(endpoint, json=payload, headers=headers) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}: {raw[:200]!r}")
                results[i] = json.loads(raw)["choices"][0]["message"]["content"]

        import asyncio

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _measured(fn: Any, profile: str | None) -> tuple[Any, float, float]:
    """Run ``fn()``; return its result, CPU seconds (process time) and wall seconds."""
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    return result, cpu, wall


def _facts(out: Any) -> dict[str, Any]:
    facts = dict(out.attrs.get("llm", {}))
    keep = ("requests", "retries", "failed_rows", "concurrency", "rpm", "tpm")
    return {k: facts.get(k) for k in keep}


def _rss_now_mb() -> float:
    """Resident set size now (VmRSS), in MiB; the peak so far where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes there, KiB here


def child(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import pandas as pd

    if not (args.scenario == 1 and args.variant == "bare"):
        # The baseline process imports pandas and aiohttp only: parrot_pandas's own import
        # counts against parrot_pandas in the whole-process ratio.
        import parrot_pandas  # noqa: F401  (registers DataFrame.llm)

    sizes = SIZES["quick" if args.quick else "full"]
    url = args.url
    result: dict[str, Any] = {"scenario": args.scenario, "variant": args.variant}

    if args.scenario == 1:
        rows = sizes["overhead_rows"]
        texts = short_texts(rows)
        warm = short_texts(100)
        if args.variant == "parrot":
            df = pd.DataFrame({"text": texts})
            _generate(pd.DataFrame({"text": warm}), url, cache=False)

            def run() -> Any:
                return _generate(df, url, cache=False)

        else:
            asyncio.run(_bare_loop(url, warm, CONCURRENCY))

            def run() -> Any:
                return asyncio.run(_bare_loop(url, texts, CONCURRENCY))

        _post_json(_root(url) + "/_reset")  # the warm-up does not count in the server stats
        out, cpu, wall = _measured(run, args.profile)
        answered = len(out) if args.variant == "bare" else int(out["output"].notna().sum())
        result.update(rows=rows, answered=answered, cpu=cpu, wall=wall)
        if args.variant == "parrot":
            result.update(_facts(out))
        return result

    if args.scenario == 2:
        rows = sizes["request_rows"]
        df = pd.DataFrame({"text": short_texts(rows)})
        out, cpu, wall = _measured(lambda: _generate(df, url, cache=False), args.profile)
        result.update(rows=rows, cpu=cpu, wall=wall, **_facts(out))
        return result

    if args.scenario == 3:
        rows = sizes["token_rows"]
        # The long document goes in the system message and a short question per row in the
        # user message: the prompt is what binds the token budget, and the echo model's answer
        # (the last user message) fits max_tokens, as a truncated answer is now a row error.
        (document,) = documents(1, TOKEN_PROMPT_CHARS, seed=3)
        texts = [f"Question {i}" for i in range(rows)]
        df = pd.DataFrame({"text": texts})
        charged = sum(server_tokens(document) + server_tokens(t) + TOKEN_MAX_TOKENS for t in texts)

        def run() -> Any:
            return _generate(df, url, cache=False, max_tokens=TOKEN_MAX_TOKENS, system=document)

        out, cpu, wall = _measured(run, args.profile)
        result.update(rows=rows, charged_tokens=charged, cpu=cpu, wall=wall, **_facts(out))
        return result

    if args.scenario == 4:
        rows = sizes["scale_rows"]
        df = pd.DataFrame({"text": documents(rows, SCALE_DOC_CHARS, seed=4)})
        before_mb = _rss_now_mb()
        cache: Any = False if args.variant == "nocache" else True

        def run() -> Any:
            return _generate(df, url, cache=cache)

        out, cpu, wall = _measured(run, args.profile)
        peak_mb = _peak_rss_mb()
        result.update(
            rows=rows,
            answered=int(out["output"].notna().sum()),
            cpu=cpu,
            wall=wall,
            rss_before_mb=before_mb,
            peak_rss_mb=peak_mb,
            **_facts(out),
        )
        return result

    raise SystemExit(f"unknown scenario {args.scenario}")


# ------------------------------------------------------------------------------ orchestrator


def _pinned(cpu: int) -> Any:
    """A preexec_fn that pins a child to one CPU (server and client never share a core)."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # The benchmark must not read the user's key or base URL.
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PARROT_PANDAS_CACHE"):
        env.pop(name, None)
    env.update(extra or {})
    return env


class Server:
    """``python -m parrot_pandas.testing`` in a subprocess, for one measurement."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self._log = tempfile.TemporaryFile(mode="w+")

    def command(self) -> list[str]:
        """The server's command line: its options as ``--name value`` flags."""
        cmd = [sys.executable, "-m", "parrot_pandas.testing", "--host", "127.0.0.1", "--port", "0"]
        for name, value in self.options.items():
            if value is not None:
                cmd += [f"--{name.replace('_', '-')}", str(value)]
        return cmd

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=_env(),
            preexec_fn=_pinned(0),
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line.startswith("http"):
            self.__exit__()
            raise RuntimeError(f"the server did not start: {line!r} {self.log()}")
        self.url = line
        return self

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(_root(self.url) + "/_stats", timeout=30) as resp:
            stats = json.loads(resp.read())
        stats.pop("by_prompt", None)
        return stats

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:]

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def measure(
    scenario: int,
    variant: str,
    server: dict[str, Any],
    *,
    quick: bool,
    env: dict[str, str] | None = None,
    profile_dir: str | None = None,
) -> dict[str, Any]:
    """One fresh server, one fresh client process; the child's JSON plus the server stats."""
    with Server(**server) as srv:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--scenario", str(scenario),
               "--variant", variant, "--url", srv.url]  # fmt: skip
        if quick:
            cmd.append("--quick")
        if profile_dir:
            cmd += ["--profile", str(Path(profile_dir) / f"scenario{scenario}-{variant}.prof")]
        started = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_env(env), preexec_fn=_pinned(1)
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(
                f"scenario {scenario} ({variant}) failed:\n{proc.stderr[-4000:]}\n"
                f"server log:\n{srv.log()}"
            )
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        result = json.loads(lines[-1])
        result["process_seconds"] = time.perf_counter() - started
        # The whole client process: interpreter start, imports and the run (user + system).
        result["process_cpu"] = (after.ru_utime - before.ru_utime) + (
            after.ru_stime - before.ru_stime
        )
        result["server"] = srv.stats()
    print(f"  scenario {scenario} {variant}: {_short(result)}", file=sys.stderr, flush=True)
    return result


def _short(result: dict[str, Any]) -> str:
    keys = ("rows", "cpu", "wall", "peak_rss_mb", "requests", "retries", "concurrency")
    parts = [f"{k}={result[k]:.3g}" if isinstance(result.get(k), float) else f"{k}={result[k]}"
             for k in keys if result.get(k) is not None]  # fmt: skip
    stats = result["server"]
    parts.append(f"server requests={stats['requests']} 429={stats['rate_limited']} "
                 f"max_in_flight={stats['max_in_flight']}")  # fmt: skip
    return " ".join(parts)


def _share_429(stats: dict[str, Any]) -> float:
    return stats["rate_limited"] / stats["requests"] if stats["requests"] else 0.0


def _mark(ok: bool) -> str:
    return "yes" if ok else "**NO**"


Row = tuple[str, str, str, str, str, str]


def scenario_overhead(quick: bool, profile_dir: str | None) -> list[Row]:
    reps = SIZES["quick" if quick else "full"]["overhead_reps"]
    runs: dict[str, list[dict[str, Any]]] = {"parrot": [], "bare": []}
    for rep in range(reps):
        # Alternated, so drift hits both alike; each pair in the other order than the last
        # (parrot, bare, bare, parrot, ...), so neither always runs right after the other.
        for variant in ("parrot", "bare")[:: 1 if rep % 2 == 0 else -1]:
            runs[variant].append(measure(1, variant, {}, quick=quick, profile_dir=profile_dir))
    per_k = {
        v: statistics.median(r["cpu"] / r["rows"] * 1000 for r in rs) for v, rs in runs.items()
    }
    walls = {v: statistics.median(r["wall"] for r in rs) for v, rs in runs.items()}
    whole = {v: statistics.median(r["process_cpu"] for r in rs) for v, rs in runs.items()}
    rows = runs["parrot"][0]["rows"]
    ratio = per_k["parrot"] / per_k["bare"]
    process_ratio = whole["parrot"] / whole["bare"]
    # The same ratios within each pair of neighbouring runs: what load on a shared machine
    # does to one pair, it does to both of its runs.
    pairs = list(zip(runs["parrot"], runs["bare"], strict=True))
    paired = statistics.median(p["cpu"] / b["cpu"] for p, b in pairs)
    paired_process = statistics.median(p["process_cpu"] / b["process_cpu"] for p, b in pairs)
    what = f"{rows:,} rows, no latency/limits, median of {reps}"
    return [
        ("1 Overhead", "parrot_pandas CPU s / 1k rows", f"{per_k['parrot']:.3f}", "",
         "", f"{what}; wall {walls['parrot']:.2f} s; {runs['parrot'][0]['requests']} requests"),
        ("1 Overhead", "bare aiohttp CPU s / 1k rows", f"{per_k['bare']:.3f}", "",
         "", f"same payloads, {CONCURRENCY} workers, one session; wall {walls['bare']:.2f} s"),
        ("1 Overhead", "ratio parrot / bare", f"{ratio:.2f}", f"<= {TARGETS['overhead_ratio']}",
         _mark(ratio <= TARGETS["overhead_ratio"]), "the run alone (process time around the call); "
         f"median of the {reps} paired ratios {paired:.2f}"),
        ("1 Overhead", "whole process CPU s, parrot / bare", f"{whole['parrot']:.2f} / "
         f"{whole['bare']:.2f}", "", "", "interpreter, imports and the run, server and client "
         "pinned to separate cores"),
        ("1 Overhead", "ratio whole process parrot / bare", f"{process_ratio:.2f}",
         f"<= {TARGETS['process_ratio']}", _mark(process_ratio <= TARGETS["process_ratio"]),
         f"median of {reps} alternating runs; median of the {reps} paired ratios "
         f"{paired_process:.2f}"),
    ]  # fmt: skip


def _limited_rows(label: str, r: dict[str, Any], floor: float, floor_text: str) -> list[Row]:
    ratio = r["wall"] / floor
    share = _share_429(r["server"])
    s = r["server"]
    note = (
        f"wall {r['wall']:.2f} s vs floor {floor_text}; client requests {r['requests']}, "
        f"retries {r['retries']}, learned rpm={r['rpm']} tpm={r['tpm']}, "
        f"final concurrency {r['concurrency']}; server max in flight {s['max_in_flight']}"
    )
    return [
        (label, "wall / floor", f"{ratio:.3f}", f"<= {TARGETS['wall_over_floor']}",
         _mark(ratio <= TARGETS["wall_over_floor"]), note),
        (label, "429 share (server)", f"{share:.1%}", f"< {TARGETS['share_429']:.0%}",
         _mark(share < TARGETS["share_429"]), f"{s['rate_limited']} of {s['requests']} requests"),
    ]  # fmt: skip


def scenario_request_bound(quick: bool, profile_dir: str | None) -> list[Row]:
    server = {"latency": LIMITED_LATENCY, "rpm": REQUEST_RPM}
    r = measure(2, "parrot", server, quick=quick, profile_dir=profile_dir)
    floor = r["rows"] / REQUEST_RPM * 60
    text = f"{floor:.1f} s ({r['rows']} rows / {REQUEST_RPM} rpm), latency {LIMITED_LATENCY} s"
    return _limited_rows("2 Request-bound", r, floor, text)


def scenario_token_bound(quick: bool, profile_dir: str | None) -> list[Row]:
    server = {"latency": LIMITED_LATENCY, "tpm": TOKEN_TPM}
    r = measure(3, "parrot", server, quick=quick, profile_dir=profile_dir)
    floor = r["charged_tokens"] / TOKEN_TPM * 60
    text = (
        f"{floor:.1f} s ({r['charged_tokens']:,} tokens charged / {TOKEN_TPM:,} tpm; "
        f"{r['rows']} rows of {TOKEN_PROMPT_CHARS} chars + max_tokens={TOKEN_MAX_TOKENS}), "
        f"latency {LIMITED_LATENCY} s"
    )
    return _limited_rows("3 Token-bound", r, floor, text)


def scenario_scale(quick: bool, profile_dir: str | None, with_cache: bool) -> list[Row]:
    variants = ["nocache"] + (["cache"] if with_cache else [])
    out: list[Row] = []
    for variant in variants:
        env = None
        tmp = None
        if variant == "cache":
            tmp = tempfile.TemporaryDirectory(prefix="parrot-bench-")
            env = {"PARROT_PANDAS_CACHE": str(Path(tmp.name) / "cache.sqlite3")}
        try:
            r = measure(4, variant, {}, quick=quick, env=env, profile_dir=profile_dir)
            if tmp is not None:
                r["cache_mb"] = sum(f.stat().st_size for f in Path(tmp.name).iterdir()) / 2**20
        finally:
            if tmp is not None:
                tmp.cleanup()
        label = "cache=False" if variant == "nocache" else "default cache (temp file)"
        rate = r["rows"] / r["wall"]
        extra = f", cache file {r['cache_mb']:.0f} MB" if "cache_mb" in r else ""
        note = (
            f"{r['rows']:,} rows x {SCALE_DOC_CHARS} B distinct, {label}; RSS before the call "
            f"{r['rss_before_mb']:.0f} MB; wall {r['wall']:.1f} s, CPU {r['cpu']:.1f} s"
            f"{extra}; answered {r['answered']:,}"
        )
        peak = r["peak_rss_mb"]
        out.append(("4 Scale", f"peak RSS, {label}", f"{peak:.0f} MB",
                    f"< {TARGETS['scale_rss_mb']} MB", _mark(peak < TARGETS["scale_rss_mb"]),
                    note))  # fmt: skip
        out.append(("4 Scale", f"rows / s, {label}", f"{rate:,.0f}", "", "", ""))
    return out


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine(load_before: str) -> list[str]:
    import aiohttp
    import pandas as pd

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip() or "unknown"  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- Date: {now}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"pandas {pd.__version__}, aiohttp {aiohttp.__version__}",
        f"- Machine: {platform.platform()}, {os.cpu_count()} CPUs, {cpu}",
        f"- parrot_pandas checkout: {rev}",
        f"- Load average (1/5/15 min) before: {load_before}, after: {_load()} "
        "(other work on the machine skews CPU and wall numbers)",
    ]


def table(rows: list[Row]) -> list[str]:
    head = ("Scenario", "Metric", "Result", "Target", "Met", "Details")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return lines


def orchestrate(args: argparse.Namespace) -> int:
    only = args.only
    chosen = only or [1, 2, 3, 4]
    runners = {
        1: lambda: scenario_overhead(args.quick, args.profile_dir),
        2: lambda: scenario_request_bound(args.quick, args.profile_dir),
        3: lambda: scenario_token_bound(args.quick, args.profile_dir),
        4: lambda: scenario_scale(args.quick, args.profile_dir, not args.no_cache_run),
    }
    load_before = _load()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if busy > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {busy:.1f} on {os.cpu_count()} CPUs: the machine is "
              "busy and the numbers will be noisy", file=sys.stderr)  # fmt: skip
    rows: list[Row] = []
    failures = []
    for n in chosen:
        print(f"scenario {n} ...", file=sys.stderr, flush=True)
        try:
            rows += runners[n]()
        except Exception as exc:  # one broken scenario must not hide the others' numbers
            failures.append(n)
            rows.append((f"{n}", "error", "", "", "**NO**", str(exc).splitlines()[0][:200]))
            print(exc, file=sys.stderr)
    mode = "quick sizes" if args.quick else "full sizes"
    title = f"# parrot_pandas benchmarks ({mode}" + (f", scenarios {only}" if only else "") + ")"
    text = "\n".join(
        [title, "", *machine(load_before), "", *table(rows), "",
         "Run with `python benchmarks/run.py` (see benchmarks/README.md).", ""]
    )  # fmt: skip
    print(text)
    output = Path(args.output)
    # Keep the section packing_bench.py writes (it has its own server settings and sizes).
    old = output.read_text() if output.exists() else ""
    if "<!-- packing -->" in old:
        text += "\n" + old[old.index("<!-- packing -->") :]
    output.write_text(text)
    print(f"written to {args.output}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only",
        action="append",
        metavar="N",
        help="run only scenario N (1-4); repeat or comma-separate for several",
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, for iterating")
    p.add_argument(
        "--no-cache-run",
        action="store_true",
        help="scenario 4: skip the run with the default cache",
    )
    p.add_argument("--output", default=str(HERE / "results.md"), help="where to write the table")
    p.add_argument(
        "--profile-dir",
        default=None,
        help="write a cProfile .prof of every measured client call here",
    )
    # Child mode, used by the orchestrator.
    p.add_argument("--scenario", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="parrot", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scenario is not None:
        if not args.url:
            p.error("--scenario needs --url")
        print(json.dumps(child(args)), flush=True)
        return 0
    try:
        args.only = sorted({int(x) for part in args.only or [] for x in part.split(",") if x})
    except ValueError:
        p.error("--only takes scenario numbers 1-4, e.g. --only 2 or --only 1,3")
    if any(n not in (1, 2, 3, 4) for n in args.only):
        p.error("--only takes scenario numbers 1-4, e.g. --only 2 or --only 1,3")
    if args.profile_dir:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    # Byte-compile the checkout, as installing a package does: with PYTHONDONTWRITEBYTECODE
    # set, every measured process would otherwise compile each edited module again (~10 ms),
    # which the whole-process figure would count against parrot_pandas alone.
    compileall.compile_dir(str(HERE.parent / "parrot_pandas"), quiet=1)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
