"""`verify`: finds what is broken in a download, and `--fix` + fetch repairs it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import FAST_FETCH, read_errors, read_successes, run_cli, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image


def test_verify_finds_planted_damage_and_fix_then_fetch_repairs_it(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2"), ServerSpec("127.0.0.3")]) as farm:
        urls = []
        for server in farm.servers:
            for i in range(30):
                server.images[f"{i}.jpg"] = make_small_image(i)
                urls.append(server.url(f"/img/{i}.jpg"))
            urls.append(server.url("/missing/x"))
        out = tmp_path / "out"
        run_cli("download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--batch-size", 10, "--no-profile", *FAST_FETCH, timeout=300)
        clean = run_cli("verify", out)
        assert "8 finished batches, 62 rows, 60 images decoded" in clean.stdout
        assert "every finished batch is sound" in clean.stdout
        expected = {(r["uuid"], r["hashsum_original"]) for r in read_successes(out).to_pylist()}

        # Damage 1: one stored image's bytes flipped (its hash no longer matches).
        first, second = farm.servers
        corrupted = sorted(out.glob(f"downloaded_images/server_name={first.address}/"
                                    "partition_id=1/successes-*.parquet"))[0]
        table = pq.read_table(corrupted)
        images = table.column("image").to_pylist()
        images[0] = images[0][:100] + bytes(b ^ 0xFF for b in images[0][100:200]) + \
            images[0][200:]
        table = table.set_column(table.schema.get_field_index("image"), "image",
                                 pa.array(images, pa.binary()))
        pq.write_table(table, corrupted)
        # Damage 2: a chunk gone from a finished batch.
        lost = sorted(out.glob(f"downloaded_images/server_name={second.address}/"
                               "partition_id=2/successes-*.parquet"))[0]
        lost.unlink()

        found = run_cli("verify", out, check=False)
        assert found.returncode == 1
        summary = json.loads((out / "verify" / "summary.json").read_text())
        broken = {item["batch"]: item["problems"] for item in summary["broken"]}
        assert set(broken) == {f"server_name={first.address}/partition_id=1",
                               f"server_name={second.address}/partition_id=2"}
        assert any("hashsum_resized does not match" in p
                   for p in broken[f"server_name={first.address}/partition_id=1"])
        assert any("in neither successes nor errors" in p
                   for p in broken[f"server_name={second.address}/partition_id=2"])

        fixed = run_cli("verify", out, "--fix")
        assert "moved 2 broken batches aside" in fixed.stdout
        assert len(list((out / "verify" / "quarantine").glob("*/*/*"))) == 2
        run_cli("fetch", out, *FAST_FETCH, timeout=300)
        assert "every finished batch is sound" in run_cli("verify", out).stdout

    successes = read_successes(out).to_pylist()
    assert {(r["uuid"], r["hashsum_original"]) for r in successes} == expected
    assert len(successes) == 60 and read_errors(out).num_rows == 2
    by_md5 = {hashlib.md5(r["image"]).hexdigest() for r in successes}
    assert by_md5 == {r["hashsum_resized"] for r in successes}
