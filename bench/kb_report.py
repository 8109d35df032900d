"""The knowledge bench's markdown: quality, answer-or-hand-off, threshold tuning and scale tables."""

from __future__ import annotations

from typing import Any


def markdown(report: dict[str, Any]) -> str:
    ingest, q, h = report["ingest"], report["quality"], report["held_out"]
    lines = [
        f"## make bench-kb ({report['timestamp']}, {report['machine']})",
        "",
        f"CMRC 2018 trial: {ingest['documents']} documents, {q['questions']} questions; chunks of "
        f"{report['chunk_tokens']} tokens, {report['passages']} passages in the LLM prompt; "
        + (f"hybrid retrieval with embeddings of {report['embeddings_model']} (the answer-or-hand-off runs "
           "are BM25's decision alone)." if report.get("embeddings_model") else "BM25 alone."),
        "",
        "| figure | value | target |",
        "|---|---:|---:|",
        f"| ingest (parse + chunk + index) | {ingest['documents_per_s']} docs/s, {ingest['chunks_per_s']} chunks/s | |",
        f"| cited-document recall@1 | {q['recall_at_1']} | >= 0.95 |",
        f"| recall@5 / MRR@10 | {q['recall_at_5']} / {q['mrr_at_10']} | |",
        f"| gold span in the offline answer (handoffs count as misses) | {q['span_in_answer']} | >= 0.80 |",
        f"| gold span in the extract, whatever the decision | {q['span_in_extract']} | |",
        f"| gold span in the LLM prompt | {q['span_in_prompt']} | >= 0.99 |",
        f"| ... with adjacent chunks of a document joined | {q['span_in_prompt_joined']} | >= 0.99 |",
        f"| answer-or-hand-off balanced accuracy, half held out (threshold {h['threshold']}) | "
        f"{h['balanced_accuracy']} | >= 0.95 |",
        f"| ... on the four splits | {', '.join(map(str, h['balanced_accuracy_all_splits']))} | |",
        f"| ... counting an answer from the wrong document as wrong | {h['balanced_accuracy_strict']} | |",
        f"| ... a raw BM25 top-score threshold tuned on the split (reference) | {h['raw_bm25_best']} | |",
    ]
    lines += ["", "Threshold tuning (best on one split, balanced accuracy there and on the three others):", "",
              "| split | best threshold | on itself | on the others |", "|---|---:|---:|---:|"]
    lines += [f"| {t['split']} | {t['best_threshold']} | {t['tuned_on_itself']} | {t['on_the_other_splits']} |"
              for t in h["tuning"]]
    lines += ["", "Scale: indexes built and stored by one process, loaded from their bytes by a fresh one that then "
              f"asks the {report['quality']['questions']} questions x {report['rounds']} (`retrieve`, k = passages; "
              "a random tenant per question); RSS of that process (and its growth from loading the indexes, "
              "after the segmenter and numpy are loaded):", "",
              "| tenants x chunks | p50 ms | p99 ms | CPU ms/query (p99) | RSS MiB (indexes) | load ms/tenant "
              "| stored MiB | build s (*: analysis reused) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    largest = max(report["scale"], key=lambda t: t["tenants"] * t["chunks_per_tenant"], default=None)
    for t in report["scale"]:
        lines.append(f"| {t['tenants']:,} x {t['chunks_per_tenant']:,} | {t['p50_ms']} | {t['p99_ms']} | "
                     f"{t['cpu_mean_ms']} ({t['cpu_p99_ms']}) | {t['rss_mib']} ({t['indexes_rss_mib']}) | "
                     f"{t['load_ms_per_tenant']} | "
                     f"{t['bytes_mib']} | {t['build_s']}{'' if t is largest else '*'} |")
    return "\n".join(lines) + "\n"
