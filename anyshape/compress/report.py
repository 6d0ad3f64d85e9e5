"""report.md of a compressed family: one table per budget, the heuristics beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def describe(shape: dict[str, Any]) -> str:
    """'L20 H448 Q6/G2 F1024' from a Shape's dict."""
    return (
        f"L{len(shape['layers'])} H{shape['hidden_size']} "
        f"Q{shape['num_attention_heads']}/G{shape['num_key_value_heads']} F{shape['intermediate_size']}"
    )


def write_report(summary: dict[str, Any], path: Path) -> None:
    """Writes the markdown report of a `compress` summary to `path`."""
    settings, parent = summary["settings"], summary["parent"]
    basis = settings["budget_basis"]
    lines = [
        f"# {summary['model']}: a family of {len(summary['members'])} Shapes",
        "",
        f"Budgets are fractions of the parent's {basis} parameters. Perplexity: the first "
        f"{settings['eval_tokens']:,} tokens of {summary['data']} (held out from calibration), windows of 512. "
        f"Latency: batch 1 on the CPU, one decode step and a 128-token prefill (ms). Search: "
        f"{settings['algorithm']}, {settings['trials']} Shapes per budget; layers ranked by "
        f"{settings['depth_method']}.",
        "",
        f"Parent: {describe(parent['shape'])}, {parent['num_parameters']:,} parameters, perplexity "
        f"{parent['ppl']:.2f}, decode {parent['latency']['decode_ms']:.1f} ms, prefill "
        f"{parent['latency']['prefill_ms']:.1f} ms.",
        "",
        *_training(summary),
    ]
    count = "num_parameters" if basis == "total" else "num_parameters_non_embedding"
    for member in summary["members"]:
        check = member.get("check_ppl")
        compensation = f"compensated: {'yes' if member['compensated'] else 'no'}" + (
            f" (held-out check {check['plain']:.2f} -> {check['compensated']:.2f})" if check else ""
        )
        tried = member.get("candidates", [])
        if tried:
            compensation += ". Candidates compensated (held-out check, plain -> compensated): " + "; ".join(
                f"{c['source']} {describe(c['shape'])} {c['check_ppl']['plain']:.2f} -> "
                f"{c['check_ppl']['compensated']:.2f}"
                for c in tried
            )
        lines += [
            f"## Budget {member['budget']:g} -> `{member['folder']}/`",
            "",
            f"| model | Shape | {basis} parameters | fraction | GFLOPs/token | decode ms | prefill ms | perplexity "
            "| vs parent |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| **chosen ({member.get('source', 'search')})** | {describe(member['shape'])} | {member[count]:,} | "
            f"{member['fraction']:.3f} | "
            f"{member['flops_per_token'] / 1e9:.3f} | {member['latency']['decode_ms']:.1f} | "
            f"{member['latency']['prefill_ms']:.1f} | **{member['ppl']:.2f}** | {member['ppl'] / parent['ppl']:.2f}x |",
            f"| chosen, no compensation | same | | | | | | {member['ppl_plain']:.2f} | "
            f"{member['ppl_plain'] / parent['ppl']:.2f}x |",
        ]
        if "zero_shot" in member:
            zero_shot = member["zero_shot"]
            lines.append(
                f"| zero-shot (the parent's slice, untrained) | {describe(zero_shot['shape'])} | | | | | | "
                f"{zero_shot['ppl']:.2f} | {zero_shot['ppl'] / parent['ppl']:.2f}x |"
            )
        for name, baseline in member["baselines"].items():
            if baseline is None:
                lines.append(f"| {name} | cannot reach this budget | | | | | | | |")
            else:
                lines.append(
                    f"| {name} | {describe(baseline['shape'])} | {baseline['num_parameters']:,} | | | | | "
                    f"{baseline['ppl']:.2f} | {baseline['ppl'] / parent['ppl']:.2f}x |"
                )
        lines += ["", compensation, ""]
    lines += ["## Stages", "", "| stage | seconds | reused |", "|---|---:|---|"]
    lines += [
        f"| {name} | {t['seconds']} | {'yes' if t['reused'] else 'no'} |" for name, t in summary["stages"].items()
    ]
    path.write_text("\n".join(lines) + "\n")


_TRAIN_TEXTS = {"data": "the text's calibration half", "parent": "text sampled from the parent"}


def _training(summary: dict[str, Any]) -> list[str]:
    """The paragraph on the elastic run the members come from (none for a zero-shot family)."""
    training = summary.get("training")
    if training is None:
        return ["No training: every member is a slice of the sorted parent (zero-shot).", ""]
    before, after = training["held_out_ppl"]["before"], training["held_out_ppl"]["after"]
    slots = {"largest": "largest Shape", "smallest": "smallest Shape"}
    slots |= {f"fixed-{i}": f"{budget:g} member" for i, budget in enumerate(summary["settings"]["budgets"])}
    return [
        f"Every member is a slice of `elastic/`, the sorted parent after one elastic run of "
        f"{training['tokens']:,} tokens ({training['steps']} steps, {training['seconds'] / 60:.1f} min) of "
        f"{_TRAIN_TEXTS[summary['settings'].get('train_text', 'data')]} distilled from the frozen parent. "
        "Held-out perplexity during that run, before -> after: "
        + "; ".join(f"{name} {before[slot]:.2f} -> {after[slot]:.2f}" for slot, name in slots.items())
        + f" (the parent: {before['teacher']:.2f}).",
        "",
    ]
