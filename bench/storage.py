"""`vidgen bench storage`: the platform on an S3 store — what a job leaves behind before and after the lifecycle,
and what a download costs the gateway when it streams the bytes against when it redirects to a presigned URL.

1. Starts moto's S3 server (bench/s3server.py), the embedded platform with every blob in a bucket, the tracker and
   two gateways: one that streams (VIDGEN_BLOB_REDIRECT=never), one that redirects (auto).
2. Generates ``--jobs`` videos (``--steps`` 12 by default: one checkpoint at step 10) and measures the store per blob
   class (`vidgen storage`'s classification).
3. Downloads every video's variants (master, manifest, renditions) ``--rounds`` times through each gateway, and a
   ``--large-mb`` file put into a published folder ``--large-rounds`` times, following redirects, with the gateway
   process's CPU time accounted: per request (the small files) and per GB served (the large one), side by side.
4. Starts the lifecycle stage (VIDGEN_LIFECYCLE_INTERMEDIATE_S=0), waits for its BlobsDeleted event of every job,
   measures the store again and checks each published set byte for byte (sha256 against the event's references).

Ends with ``RESULT jobs=N intermediate_left=0 published_ok=N bytes_per_job_before=… bytes_per_job_after=…
redirect=true|false gateway_cpu_s_per_gb_streamed=… gateway_cpu_s_per_gb_redirected=…``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from .common import CpuAccount, format_table, print_result, wait_healthy

TENANT = "bench"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # let the 307 through as an HTTPError, to see it


def _get(url: str, key: str, follow: bool = True) -> tuple[int, bytes, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, response.read(), response.headers.get("Location", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Location", "")


def _usage(store, prefixes: list[str]) -> tuple[Counter, Counter]:
    """(bytes, blobs) per blob class under the jobs' folders (the store holds nothing else of theirs)."""
    from consumers.lifecycle import classify

    used, count = Counter(), Counter()
    for prefix in prefixes:
        for stat in store.list(prefix):
            used[classify(stat.key)] += stat.size
            count[classify(stat.key)] += 1
    return used, count


def _download(urls: list[str], key: str, gateway) -> dict:
    """GET every URL (following redirects) with the gateway process's CPU time accounted."""
    first = _get(urls[0], key, follow=False)
    served = 0
    with CpuAccount({"gateway": [gateway.pid]}) as account:
        for url in urls:
            status, body, _ = _get(url, key)
            if status != 200:
                raise SystemExit(f"{url} answered {status}: {body[:200]!r}")
            served += len(body)
    cpu_s = account.used.get("gateway") or 0.0
    return dict(status=first[0], redirected=first[0] in (302, 303, 307, 308), requests=len(urls), gb=served / 1e9,
                cpu_s=cpu_s, cpu_s_per_gb=cpu_s / (served / 1e9), cpu_ms_per_request=1000 * cpu_s / len(urls),
                other_cores=account.cores(CpuAccount.OTHER))


def _variants(published: dict) -> dict[str, dict]:
    return {"video": published["video"], "manifest": published["manifest"],
            **{r["name"]: r["media"] for r in published["renditions"]}}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench storage")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="denoising steps per job (10 or more: a checkpoint)")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", default="256x192", help="big enough that a download is more than its request")
    parser.add_argument("--rounds", type=int, default=10, help="downloads of every variant through each gateway")
    parser.add_argument("--large-mb", type=int, default=64, help="size of the large file downloaded")
    parser.add_argument("--large-rounds", type=int, default=4, help="downloads of it through each gateway")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))

    from consumers.progress import LIFECYCLE, read_events
    from gateway.tenants import TenantStore
    from producers.requests import VideoRequests
    from streams import topics
    from streams.blobs import BlobError, open_blob_store
    from streams.embedded import free_port
    from streams.supervisor import STAGE_NAMES, PlatformProcesses

    from .s3server import s3_server

    var_dir = Path(tempfile.mkdtemp(prefix="vidgen-bench-storage-"))
    with s3_server(var_dir / "s3") as s3_env:
        platform = PlatformProcesses(var_dir, stages=(*STAGE_NAMES, "tracker"), env={
            **s3_env, "VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000", "VIDGEN_LIFECYCLE_INTERMEDIATE_S": "0"})
        try:
            settings = platform.start()
            store = open_blob_store(settings)
            tenants = TenantStore()
            _, key = tenants.create_tenant(TENANT, "premium", rate_per_s=1e6, burst=10**6,
                                           max_in_flight=10**6, max_per_hour=10**9)
            tenants_file = tenants.save(var_dir / "tenants.toml")
            gateways = {}
            for mode in ("never", "auto"):
                port = free_port()
                process = platform.add_gateway(port, args=("--tenants", str(tenants_file)),
                                               env={"VIDGEN_BLOB_REDIRECT": mode})
                gateways[mode] = (f"http://127.0.0.1:{port}", process)
            print(f"platform on {s3_env['VIDGEN_BLOB_URL']} ({s3_env['VIDGEN_BLOB_ENDPOINT']}); logs in "
                  f"{platform.log_dir}", flush=True)

            # 2. The jobs, and what they leave in the store.
            with VideoRequests(settings) as requests:
                job_ids = [requests.submit(f"storage bench video {i}", tenant=TENANT, tier="premium", width=width,
                                           height=height, num_frames=args.frames, steps=args.steps, seed=i)
                           for i in range(args.jobs)]
            published: dict[str, dict] = {}
            deadline = time.monotonic() + args.timeout
            for job_event in read_events(settings, lifecycle=LIFECYCLE):
                if job_event is not None and job_event.event.get("job_id") in job_ids:
                    if job_event.topic == topics.PUBLISHED.name:
                        published[job_event.event["job_id"]] = job_event.event
                    elif job_event.topic in (topics.FAILED.name, topics.CANCELLED.name):
                        raise SystemExit(f"job {job_event.event['job_id']} ended on {job_event.topic}: "
                                         f"{json.dumps(job_event.event)[:300]}")
                if len(published) == len(job_ids):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out: {len(published)}/{len(job_ids)} published; see {platform.log_dir}")
            prefixes = [f"{job_id}/" for job_id in job_ids]
            before, _ = _usage(store, prefixes)

            # 3. Downloads through each gateway, its CPU accounted: the videos' variants (small: the cost of a
            # request), then one large file put into the first job's published folder (the cost of the bytes).
            for base, process in gateways.values():
                wait_healthy(base, process, 90.0, platform.log_dir)
            first_job = next(iter(published.values()))
            folder = store.key_of(first_job["video"]["uri"]).rsplit("/", 1)[0].split("/")
            large_ref = store.put(bytes(range(256)) * (args.large_mb << 12), *folder, "large.mp4", dtype="video/mp4")
            downloads, large = {}, {}
            for mode, (base, process) in gateways.items():
                urls = [f"{base}/v1/videos/{job_id}/content?variant={variant}"
                        for job_id, event in published.items() for variant in _variants(event)]
                for url in urls:  # until the gateway's view has every job published
                    while _get(url, key, follow=False)[0] == 409 and time.monotonic() < deadline:
                        time.sleep(0.2)
                downloads[mode] = _download(urls * args.rounds, key, process)
                large[mode] = _download([f"{base}/v1/videos/{first_job['job_id']}/published/large.mp4"]
                                        * args.large_rounds, key, process)
            store.delete([store.key_of(large_ref["uri"])])  # not the job's: out of the usage figures

            # 4. The lifecycle, and what is left.
            platform.add_stage("lifecycle")
            deleted_for: set[str] = set()
            for job_event in read_events(settings, lifecycle=(topics.BLOB_LIFECYCLE,)):
                if job_event is not None and job_event.event.get("job_id") in job_ids:
                    deleted_for.add(job_event.event["job_id"])
                if deleted_for >= set(job_ids):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out waiting for the lifecycle: {len(deleted_for)}/{len(job_ids)} jobs")
            after, left = _usage(store, prefixes)
            published_ok = 0
            for event in published.values():
                try:
                    for ref in (*_variants(event).values(), event["playlist"]):
                        store.get(ref)
                    published_ok += 1
                except BlobError as exc:
                    print(f"published set of {event['job_id']} damaged: {exc}")
            platform.check_alive()
        finally:
            platform.stop()

    from consumers.lifecycle import INTERMEDIATE_CLASSES

    classes = sorted(set(before) | set(after))
    print(format_table(["blob class", "bytes/job before", "bytes/job after"],
                       [(c, before[c] / args.jobs, after[c] / args.jobs) for c in classes], float_format="{:,.0f}"))
    rows = [(f"{what} ({mode})", d["status"], d["requests"], d["gb"] * 1000, d["cpu_s"], d["cpu_s_per_gb"],
             d["cpu_ms_per_request"], d["other_cores"])
            for what, measured in (("variants", downloads), (f"{args.large_mb} MiB file", large))
            for mode, d in measured.items()]
    print(format_table(["downloads (gateway)", "first answer", "requests", "MB served", "gateway CPU s",
                        "CPU s per GB", "CPU ms per request", "other cores"], rows))
    print("(other cores: the rest of the machine meanwhile — this process downloading, moto serving the redirected "
          "bytes, the platform; CPU time is counted in 10 ms clock ticks)")
    intermediate_left = sum(left[c] for c in INTERMEDIATE_CLASSES)
    print_result(jobs=args.jobs, intermediate_left=intermediate_left,
                 published_ok=published_ok, bytes_per_job_before=sum(before.values()) / args.jobs,
                 bytes_per_job_after=sum(after.values()) / args.jobs,
                 redirect=str(downloads["auto"]["redirected"] and large["auto"]["redirected"]).lower(),
                 gateway_cpu_s_per_gb_streamed=large["never"]["cpu_s_per_gb"],
                 gateway_cpu_s_per_gb_redirected=large["auto"]["cpu_s_per_gb"])
    return 0 if published_ok == args.jobs and intermediate_left == 0 else 1
