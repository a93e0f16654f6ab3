"""aigw benchmark (run it as `scripts/bench`; it is not a timed test).

One module per section, all sharing `runner` (processes, interleaved rounds, ratios, CPU from
/proc, the report):

1. `hotpath`: the addon's `request` hook (auth plus budget decision and reservation, the
   reservation always one ledger write transaction) in-process, driven with mitmproxy's
   taddons/tflow, against a store of 100,000 keys: p50/p99/p99.9/max in microseconds. Each
   request is then settled through the `response` hook with a canned OpenAI answer, timed
   separately. Target: request hook p99 <= 50 us. With `--before REV` (`before`), the request
   hook of that revision and of the working tree, each in a subprocess of its own running
   `hookdriver` on its tree's code, in interleaved rounds: their ratio.
2. `throughput`: a local upstream on 127.0.0.1, then three bare mitmdump processes and three
   with the addon (each on a store of its own; identical processes differ by several percent
   here), each warmed up unmeasured. A load generator in its own process drives them in turn,
   bare and addon alternating, because this machine is noisy and drifts. Prints req/s per round,
   the medians and the ratio addon/bare: the median, over the addon rounds, of each one's req/s
   over the mean of the bare rounds just before and after it. Target: ratio >= 0.95. Afterwards
   the stores' ledgers must have metered every request the load generator sent through the
   addon. `throughput_tls` (`--only throughput-tls`): the same over HTTPS: CONNECT, TLS
   intercepted with each mitmdump's CA, TLS to an upstream with a self-signed certificate made
   at start (`ssl_insecure`); handshakes during the warm-up.
2b. `proxy` (`--only proxy`): `aigw proxy` beside mitmdump, as ratios of interleaved rounds
   (see its module): mitmdump with the gateway over the floor addon (CPU per request <= 1.05x);
   `aigw proxy --workers 1` over bare mitmdump (req/s >= 1.3x, CPU <= 0.77x); `--workers 2`
   with a new connection per request (each worker >= 35% of the requests, CPU <= 1.15x of one
   worker's) and a burst of 30 against a budget with room for 5 (<= 6 admitted).
3. `stream`: a long OpenAI chat-completions SSE stream (N content events with `"usage": null`,
   then the usage event the client asked for with include_usage) from the same upstream through
   bare mitmdump (`--set stream_large_bodies=1`: bare mitmdump otherwise buffers the whole body)
   and mitmdump with the addon, in interleaved rounds: time to first body byte and total time,
   as the client sees them. Targets: throughput (bytes/s) addon/bare >= 0.95 and < 1 ms added to
   the median time to first byte. Then a 100 MB stream through the addon while mitmdump's RSS is
   sampled every 50 ms: target a peak increase < 50 MB (flat: a buffering proxy grows by 100+
   MB). The ledger must hold every stream's usage event, to the token.
4. `sync`: the fake Cloudflare KV API (tests/support/fake_kv.py, in its own process) serving a
   100,000-key namespace in the Workers gateway layout, nine records in ten version-stamped as
   aigw writes them: a full pass into a fresh store, then an incremental pass after 1% of the
   stamped records changed: requests, seconds, keys fetched (no target: figures to report).
5. `ledger` (`--only ledger`): the request path's two ledger writes (reserve, then settle with
   its log entry) as one pair, on the store's own ledger settings and on the settings before
   them, plus data synced per commit, in interleaved rounds: per-pair p50/p99 and the ratios to
   the old settings (no target: the figures to report).
6. `peers` (`--peers` or `--only peers`; never by default, not in CI): `aigw proxy --workers 1`,
   as a forward proxy and in reverse mode, beside LiteLLM's proxy with one worker, installed once
   into a venv of its own (var/bench/litellm-venv), on the same load and fake upstream, in
   interleaved rounds: the ratios of req/s and CPU per request (no target).

Everything stays on loopback, is bounded in time and count, and cleans up its processes and
temporary directories. Exit status: 0 when every target is met, 1 when one is missed, 2 when a run
was invalid (non-200 answers, the ledger did not meter the addon's requests, a process failed).

Internal modes (`python -m aigw_bench MODE`, used by the benchmark itself): `_upstream` (the fake
provider), `_loadgen`, `_streamclient`, `_fakekv` and `_burst`. Only the standard library is
imported at module level, so those processes start fast. The package changes no `sys.path`:
`scripts/bench` puts scripts/ and the project on PYTHONPATH, so that `hookdriver` can run on
another tree's code.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
