"""Helpers for the service tests: shared entry makers, a `memflow-service serve` subprocess, certificates, state.

Imported by name (`from svc_util import ...`) because every conftest.py under tests/ is module "conftest" and
the last one pytest loaded wins that name; the root conftest's helpers are loaded here from its file.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import ipaddress
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from memory_service import MemFlowError

REPO = Path(__file__).resolve().parents[2]


def _load_root_conftest():
    spec = importlib.util.spec_from_file_location("memflow_tests_root_conftest", REPO / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


ROOT_CONFTEST = sys.modules.get("memflow_tests_root_conftest") or _load_root_conftest()
make_spec = ROOT_CONFTEST.make_spec
make_entry = ROOT_CONFTEST.make_entry
LAYERS, DIM, EMB, KV = ROOT_CONFTEST.LAYERS, ROOT_CONFTEST.DIM, ROOT_CONFTEST.EMB, ROOT_CONFTEST.KV

SMALL_ARENA = 8 << 20  # the default 256 MiB arena takes ~0.7 s to pre-fault; tests need far less


# ---- a `memflow-service serve` subprocess ---------------------------------------------------------------

SERVING = re.compile(r"serving .* on (\S+):(\d+) \(")  # "serving DIR on HOST:PORT (plaintext, ...)"
METRICS = re.compile(r"metrics on http://\S+:(\d+)/metrics")


@dataclasses.dataclass
class ServeProc:
    proc: subprocess.Popen
    port: int
    data_dir: str
    stderr_path: str
    line: str

    @property
    def metrics_port(self) -> Optional[int]:
        m = METRICS.search(self.line)
        return int(m.group(1)) if m else None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return Path(self.stderr_path).read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def serve_cmd(data_dir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "memory_service.cli", "serve", "--data-dir", data_dir, "--port", "0", *args]


def start_serve(data_dir: str, *args: str, timeout: float = 60.0, prefix: Optional[list[str]] = None,
                log_dir: Optional[str] = None) -> ServeProc:
    """Start `memflow-service serve` on a free port and wait for its "serving ... on host:port" line."""
    log_dir = log_dir or os.path.dirname(os.path.abspath(data_dir))
    n = 0
    while os.path.exists(os.path.join(log_dir, f"serve-{n}.stderr")):
        n += 1
    stderr_path = os.path.join(log_dir, f"serve-{n}.stderr")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMFLOW_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen((prefix or []) + serve_cmd(data_dir, *args), cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            m = SERVING.search(line)
            if m:
                return ServeProc(proc, int(m.group(2)), data_dir, stderr_path, line.strip())
            if not line and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise RuntimeError(f"memflow-service serve did not come up (rc {proc.returncode}):\n"
                       + Path(stderr_path).read_text(errors="replace")[-3000:])


# ---- auth and TLS material ---------------------------------------------------------------------------

def write_tokens(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(["# tenant:token[:ro]", *lines, ""]))
    return str(path)


def self_signed_cert(directory: Path, name: str = "server") -> tuple[str, str]:
    """A self-signed certificate for localhost / 127.0.0.1 / ::1; returns (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


# ---- Prometheus ---------------------------------------------------------------------------------------------

def scrape(port: int) -> dict:
    """{(name, sorted labels): value} of every sample at http://127.0.0.1:port/metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_in_flight(port: int, method: str, n: int = 1, tries: int = 2000) -> None:
    """Wait until the service is handling `n` calls of `method` (its in-flight gauge), polling /metrics."""
    for _ in range(tries):
        if scrape(port).get(("memflow_requests_in_flight", (("method", method),)), 0) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"the service never had {n} {method} call(s) in flight")


# ---- comparable views of results -----------------------------------------------------------------------

def arr(a) -> tuple:
    a = np.asarray(a)
    return (str(a.dtype), a.shape, np.ascontiguousarray(a).tobytes())


def meta_view(m) -> tuple:
    """An EntryMeta without what depends on the wall clock (created, last hit, decayed frequency)."""
    return dataclasses.astuple(dataclasses.replace(m, created=0.0, last_hit=None, lfu=0.0))


def bank_state(memory, streams: Optional[list[str]] = None) -> tuple:
    """Everything a failed call must leave as it was: stats, specs, entry metadata, every payload byte."""
    names = sorted(s.name for s in memory.list_streams()) if streams is None else streams
    st = memory.stats()
    out = [tuple(sorted((dataclasses.astuple(s) for s in st.streams))), st.entries, st.payload_bytes,
           tuple(sorted((s.name, repr(s)) for s in memory.list_streams()))]
    for name in names:
        metas = memory.entries(name)
        out.append((name, tuple(meta_view(m) for m in metas)))
        spec = next(s for s in memory.list_streams() if s.name == name)
        live = [m.entry_id for m in metas if m.codec != "none"]
        if spec.kv is not None and live:
            out.append(arr(memory.fetch(name, live).kv))
    return tuple(out)


def outcome(fn) -> tuple:
    """("ok", value) or ("error", class name, message) - what a congruence test compares."""
    try:
        return ("ok", fn())
    except MemFlowError as exc:
        return ("error", type(exc).__name__, str(exc))
