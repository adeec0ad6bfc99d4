"""Hand-made mutation testing: re-apply the mutants found while hardening the tests, and check the tests kill them.

    python tests/mutants.py --check                  # every mutant's text is in the code exactly once (seconds)
    python tests/mutants.py --only iopo-K1 'ckpt-*'  # some mutants (ids or fnmatch patterns); --list shows them
    python tests/mutants.py                          # all of them: well over an hour on 2 cores

A mutant is a small, plausible mistake written as an exact text replacement in one source file. Each runs in a
throw-away copy of the git-tracked files (the checkout itself is never written) with its own pytest selection,
stopping at the first failure. The claim this reproduces: the tests kill every mutant except those in
EQUIVALENT, which change nothing a test could observe (the reason is given for each). Exit status 1 on a
survivor outside EQUIVALENT, a mutant that no longer applies, a timeout or a pytest error; 2 if a selection
already fails without any mutant.

When the code moves, run --check and rewrite the old/new text of a mutant that no longer applies so that it
makes the same change to the current code. A new list goes at the end of MUTANTS under its own id prefix.
"""

import argparse
import collections
import fnmatch
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per pytest run; the longest selection (TRAIN) takes about a minute on 2 cores

I, D, M, E, G, B = "iopo.py", "data.py", "model.py", "eval.py", "trace_gen.py", "bench.py"
TRAIN = "tests/test_losses.py tests/test_kernel.py tests/test_train.py"
DATA = "tests/test_data.py tests/test_model.py"
PACK = "tests/test_scale.py -k pack"
EVAL = "tests/test_eval.py tests/test_trace_gen.py"
MODEL = "tests/test_model.py tests/test_bench.py"
CKPT = "tests/test_train.py"
CKPT_DATA = "tests/test_train.py tests/test_data.py"
CKPT_MODEL = "tests/test_model.py tests/test_train.py"

# (id, file, old, new, pytest arguments); ids carry the prefix of the round that wrote them: iopo-, data-,
# eval- (round 1), model-, ckpt- (round 2). `old` must occur exactly once in `file`.
MUTANTS = [
    # iopo.py, log-prob kernel: masked reference, chunked log-sum-exp, fused backward, frozen head, Scorer shift
    ("iopo-K1", I, "    return picked.masked_fill(~scored, 0.0)\n", "    return picked\n", TRAIN),
    ("iopo-K2", I, "lse = row_max.squeeze(1) + sum_exp.log()", "lse = sum_exp.log()", TRAIN),
    ("iopo-K3", I, "-scale / row_sums", "-scale * row_sums", TRAIN),
    ("iopo-K4", I, "labels] += scale", "labels] += 1", TRAIN),
    ("iopo-K5", I, "return (grad_logps[:, None] * factor).to(factor.dtype)", "return factor.to(factor.dtype)", TRAIN),
    ("iopo-K6", I, "else flat_hidden[scored]  # (n, D)", "else flat_hidden[:len(scored)]  # (n, D)", TRAIN),
    ("iopo-K7", I, "y[s:s + rows], use_triton, False)[0]", "y[s:s + rows], use_triton, False)[1]", TRAIN),
    ("iopo-K8", I, "frozen_head = not weight.requires_grad", "frozen_head = weight.requires_grad", TRAIN),
    ("iopo-K9", I, "int(y.max()) >= vocab_size", "int(y.max()) > vocab_size", TRAIN),
    ("iopo-K10", I, "sub_(lse[s:e, None])", "sub_(lse[s:e, None].roll(1, 0))", TRAIN),
    ("iopo-K11", I, "return token_logprobs(hidden[:, :-1], weight, labels[:, 1:], scored_index=scored_index)",
     "return token_logprobs(hidden[:, 1:], weight, labels[:, 1:], scored_index=scored_index)", TRAIN),
    ("iopo-K12", I, "grad_weight.addmm_(grad_logits.T, h)", "grad_weight.addmm_(grad_logits.T, h, alpha=0.5)", TRAIN),
    # iopo.py, losses: SFT, DPO, IOPO (full / no_output_pref / three_seq), label smoothing, metrics, ftx term
    ("iopo-L1", I, "mask.sum().clamp(min=1) if n_tokens", "mask.sum() if n_tokens", TRAIN),
    ("iopo-L2", I, "-(token_logps * mask).sum()", "-(token_logps).sum()", TRAIN),
    ("iopo-L3", I, "- label_smoothing * F.logsigmoid(-z)", "+ label_smoothing * F.logsigmoid(-z)", TRAIN),
    ("iopo-L4", I, "-(1 - label_smoothing) * F.logsigmoid(z)", "-F.logsigmoid(z)", TRAIN),
    ("iopo-L5", I, "r_l = logp_l - ref_logp_l", "r_l = logp_l - ref_logp_w", TRAIN),
    ("iopo-L6", I, "loss = _bradley_terry(z, label_smoothing).mean()",
     "loss = _bradley_terry(z, label_smoothing).sum()", TRAIN),
    ("iopo-L7", I, '"accuracy": (r_w > r_l)', '"accuracy": (r_w >= r_l)', TRAIN),
    ("iopo-L8", I, '"rewards/rejected": (beta * r_l).mean()', '"rewards/rejected": r_l.mean()', TRAIN),
    ("iopo-L9", I, "z = beta * (output_pref + input_pref) / 2", "z = beta * (output_pref + input_pref)", TRAIN),
    ("iopo-L10", I, "input_pref = (r11 - r21) + (r22 - r12)", "input_pref = (r11 - r21) + (r12 - r22)", TRAIN),
    ("iopo-L11", I, "+ _bradley_terry(beta * (r22 - r12), label_smoothing)) / 2",
     "+ _bradley_terry(beta * (r22 - r21), label_smoothing)) / 2", TRAIN),
    ("iopo-L12", I, "_bradley_terry(beta * (2 * r11 - r12 - r21)", "_bradley_terry(beta * (r11 - r12 - r21)", TRAIN),
    ("iopo-L13", I, "r21 = logp_y1_x2 - ref_logp_y1_x2", "r21 = logp_y1_x2 - ref_logp_y2_x2", TRAIN),
    ("iopo-L14", I, '"margins/input_y2": beta * (r22 - r12)', '"margins/input_y2": beta * (r22 - r21)', TRAIN),
    ("iopo-L15", I, 'm["accuracy/input"] = (r11 > r21).float()', 'm["accuracy/input"] = (r11 > r12).float()', TRAIN),
    ("iopo-L16", I, "((r11 > r12).float() + (r22 > r21).float()) / 2",
     "((r11 > r12).float() + (r22 >= r21).float()) / 2", TRAIN),
    ("iopo-L17", I, "return losses.mean(), _iopo_metrics", "return losses.sum(), _iopo_metrics", TRAIN),
    ("iopo-L18", I, "term = -logp_y1_x1 / n_y1.clamp(min=1)", "term = -logp_y1_x1 / n_y1", TRAIN),
    ("iopo-L19", I, "term = term - logp_y2_x2 / n_y2.clamp(min=1)",
     "term = term + logp_y2_x2 / n_y2.clamp(min=1)", TRAIN),
    ("iopo-L20", I, '"rewards/y1_x2": beta * r21', '"rewards/y1_x2": beta * r12', TRAIN),
    # iopo.py, LoRA: scale, zero B, merge, dropout on the update, merged copy
    ("iopo-R1", I, "self.scale = alpha / rank", "self.scale = rank / alpha", TRAIN),
    ("iopo-R2", I, "self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))",
     "self.lora_B = nn.Parameter(torch.randn(self.out_features, rank, device=device) * 0.02)", TRAIN),
    ("iopo-R3", I, "(self.weight.float() + self.scale * self.lora_B @ self.lora_A)",
     "(self.weight.float() + self.lora_B @ self.lora_A)", TRAIN),
    ("iopo-R4", I, "F.linear(self.dropout(x).to(self.lora_A.dtype)", "F.linear(x.to(self.lora_A.dtype)", TRAIN),
    ("iopo-R5", I, 'state[f"{name}.weight"] = m.merged_weight().detach().to("cpu")',
     'state[f"{name}.weight"] = m.weight.detach().to("cpu")', TRAIN),
    # iopo.py, training glue: lr schedule, sequence sums, method_loss columns, SFT denominator, gradient accumulation
    ("iopo-T1", I, "if step < warmup:", "if step <= warmup:", TRAIN),
    ("iopo-T2", I, "progress = (step - warmup) / max(1, total - warmup)",
     "progress = (step - warmup) / max(1, total - warmup - 1)", TRAIN),
    ("iopo-T3", I, "n = (labels[:, 1:] != IGNORE_INDEX).sum(-1)\n",
     "n = (labels[:, :-1] != IGNORE_INDEX).sum(-1)\n", TRAIN),
    ("iopo-T4", I, "logps = token_logps.sum(-1)  # (R,)", "logps = token_logps.mean(-1)  # (R,)", TRAIN),
    ("iopo-T5", I, "dpo_loss(logp_w, logp_l, ref[:, 0], ref[:, 1],",
     "dpo_loss(logp_w, logp_l, ref[:, 1], ref[:, 0],", TRAIN),
    ("iopo-T6", I, "else n.chunk(4)[2]", "else n.chunk(4)[1]", TRAIN),
    ("iopo-T7", I, "scored = labels[:, 1:] != IGNORE_INDEX  # (R, T-1)",
     "scored = labels[:, :-1] != IGNORE_INDEX  # (R, T-1)", TRAIN),
    ("iopo-T8", I, 'n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float() * weight',
     'n = (batch["labels"][:, :-1] != IGNORE_INDEX).sum().float() * weight', TRAIN),
    ("iopo-T9", I, "(loss * (weight / cfg.grad_accum)).backward()", "(loss * weight).backward()", TRAIN),
    ("iopo-T10", I, "sums[k] = sums.get(k, 0.0) + v * (weight / cfg.grad_accum)",
     "sums[k] = sums.get(k, 0.0) + v * weight", TRAIN),
    # iopo.py, packed rows and an uneven last micro-batch over two processes (test_scale selections)
    ("iopo-T11", I, "keep = [0, 1, 3]", "keep = [0, 1, 2]", "tests/test_scale.py -k test_packed_equals_unpacked"),
    ("iopo-T12", I, "t[0, :half], t[1, :half], t[0, half:], t[1, half:]",
     "t[0, :half], t[1, :half], t[1, half:], t[0, half:]", "tests/test_scale.py -k test_packed_equals_unpacked"),
    ("iopo-T13", I, "weight = len(mine) * world / len(positions)",
     "weight = len(mine) / len(positions)", "tests/test_scale.py -k test_uneven_last_micro_batch"),
    ("iopo-T14", I, "n_tokens = round(values.pop() * world)",
     "n_tokens = round(values.pop())", "tests/test_scale.py -k test_uneven_last_micro_batch"),
    # data.py, truncation: infer_seqlen, pair lengths, cut both answers to one length
    ("data-D01", D, "if target_len * 2 < cutoff_len:", "if target_len * 2 <= cutoff_len:", DATA),
    ("data-D02", D, "elif source_len * 2 < cutoff_len:", "elif source_len * 2 <= cutoff_len:", DATA),
    ("data-D03", D, "max_target = int(cutoff_len * (target_len / (source_len + target_len)))",
     "max_target = round(cutoff_len * (target_len / (source_len + target_len)))", DATA),
    ("data-D05", D, "x_len, y_len = max(map(len, x_ids)), max(map(len, y_ids))",
     "x_len, y_len = max(map(len, x_ids)), min(map(len, y_ids))", DATA),
    ("data-D06", D, "truncated = max_len is not None and x_len + y_len > max_len",
     "truncated = max_len is not None and x_len + y_len >= max_len", DATA),
    ("data-D07", D, "seqs = [_join(x_ids[i][:x_len], y_ids[j][:y_len]) for i, j in pairs]",
     "seqs = [_join(x_ids[i][-x_len:], y_ids[j][:y_len]) for i, j in pairs]", DATA),
    # data.py, encoding and collation: prompt masks, end of turn, seam merges, pair order, batch stacking
    ("data-D08", D, 'return {"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * len(p_ids) + r_ids}',
     'return {"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * (len(p_ids) + 1) + r_ids[1:]}', DATA),
    ("data-D10", D, "end = full.rfind(tok.end_of_turn)", "end = full.find(tok.end_of_turn, len(head))", DATA),
    ("data-D11", D, "merges = sum(seam_merges(tok, prompts[i], answers[j], x_ids[i], y_ids[j])",
     "merges = sum(seam_merges(tok, prompts[i], answers[i], x_ids[i], y_ids[i])", DATA),
    ("data-D13", D, "        for s in seqs:\n            scored =",
     "        for s in seqs[:1]:\n            scored =", DATA),
    ("data-D14", D, "[(0, 0), (0, 1)],\n", "[(0, 1), (0, 0)],\n", DATA),
    ("data-D15", D, "[(0, 0), (0, 1), (1, 1), (1, 0)]", "[(0, 0), (0, 1), (1, 0), (1, 1)]", DATA),
    ("data-D16", D, "return _join(ids[:n_prompt], ids[n_prompt:])",
     "return _join(ids[:n_prompt + 1], ids[n_prompt + 1:])", DATA),
    ("data-D18", D, 'return collate_sft([ex["w"] for ex in batch] + [ex["l"] for ex in batch], pad_id, multiple)',
     'return collate_sft([s for ex in batch for s in (ex["w"], ex["l"])], pad_id, multiple)', DATA),
    # data.py, shared-prompt packing: layout, positions, pair order (test_scale -k pack)
    ("data-D20", D, "labels_b[p + la + 1:] = y_b[1:]", "labels_b[p + la + 1:] = y_b[:-1]", PACK),
    ("data-D21", D, '"position_ids": list(range(p + la)) + list(range(p, p + lb)),',
     '"position_ids": list(range(p + la + lb)),', PACK),
    ("data-D23", D, "(segment_ids == ANSWER_A)).sum(1).max())", "(segment_ids == ANSWER_A)).sum(1).min())", PACK),
    ("data-D25", D, "rows = [pack_pair(ex[a], ex[b]) for a, b in PACKED_PAIRS[kind] for ex in batch]",
     "rows = [pack_pair(ex[a], ex[b]) for ex in batch for a, b in PACKED_PAIRS[kind]]", PACK),
    ("data-D26", D, '(("y1_x1", "y2_x1"), ("y2_x2", "y1_x2"))', '(("y1_x1", "y2_x1"), ("y1_x2", "y2_x2"))', PACK),
    # data.py, batch sampler and held-out split
    ("data-D27", D, "if self.drop_last and len(out[-1]) < self.batch_size:",
     "if self.drop_last and len(out[-1]) <= self.batch_size:", DATA),
    ("data-D30", D, "[self.indices[p] for p in positions]", "list(positions)", DATA),
    ("data-D31", D, "held = set(random.Random(seed).sample(range(len(ds)), n_heldout))",
     "held = set(range(n_heldout))", DATA),
    # model.py, the network: RMSNorm, llama3 RoPE, GQA, causal and sliding-window masks, KV cache, packed windows
    ("data-M01", M, "x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)",
     "x = x * (torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) + self.eps)", DATA),
    ("data-M02", M, "smooth = (old_len / wavelen - low) / (high - low)",
     "smooth = (old_len / wavelen - high) / (high - low)", DATA),
    ("data-M05", M, "return t if n == 1 else t.repeat_interleave(n, dim=1)",
     "return t if n == 1 else t.repeat(1, n, 1, 1)", DATA),
    ("data-M06", M, "is_causal=mask is None)", "is_causal=True)", DATA),
    ("data-M07", M, "allowed = allowed & (k_idx > q_idx - window)",
     "allowed = allowed & (k_idx >= q_idx - window)", DATA),
    ("data-M09", M, "band = attention_mask_for(torch.ones(1, T, dtype=torch.bool, device=q.device), 0, T, window)",
     "band = attention_mask_for(torch.ones(1, T, dtype=torch.bool, device=q.device), 0, T, window + 1)", PACK),
    ("data-M10", M, "y_b = causal_pass(gather(q), repeat_kv(gather(k), n), repeat_kv(gather(v), n), rows.window)",
     "y_b = causal_pass(gather(q), repeat_kv(gather(k), n), repeat_kv(gather(v), n), None)", PACK),
    ("data-M11", M, "if padded or (window is not None and past + T > window) or (past > 0 and T > 1):",
     "if padded or (window is not None and past + T > window):", DATA),
    ("data-M12", M, "if padded or (window is not None and past + T > window) or (past > 0 and T > 1):",
     "if padded or (window is not None and T > window) or (past > 0 and T > 1):", DATA),
    ("data-M13", M, "return self.sliding_window is not None and i >= self.max_window_layers",
     "return self.sliding_window is not None and i > self.max_window_layers", DATA),
    ("data-M14", M, "position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]",
     "position_ids = torch.arange(past, past + T, device=mask.device)[None].expand(B, T)", DATA),
    ("data-M15", M, "near = position_ids[:, None, None, :] > position_ids[:, None, :, None] - window",
     "near = position_ids[:, None, None, :] >= position_ids[:, None, :, None] - window", PACK),
    # model.py, generate's stop, a tied head copy in a checkpoint, chat templates
    ("data-M21", M, "if bool(done.all()):", "if bool(done.any()):", DATA),
    ("data-M22", M, '        where.pop("lm_head.weight", None)', "        pass", DATA),
    ("data-M23", M, 'system = messages[0]["content"].strip() if', 'system = messages[0]["content"] if', DATA),
    ("data-M24", M, 'text += "".join(header(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in messages)',
     'text += "".join(header(m["role"]) + m["content"] + "<|eot_id|>" for m in messages)', DATA),
    ("data-M25", M, 'if self.default_system is not None and messages[0]["role"] != "system":',
     "if self.default_system is not None:", DATA),
    ("data-M28", M, "token = torch.where(done, torch.full_like(token, pad_token_id), token)", "pass", DATA),
    # eval.py, IFEval checkers: thresholds, loose variants, paragraphs, quotes, letters, language, sentence splits
    ("eval-E01", E, "        return actual < n\n", "        return actual <= n\n", EVAL),
    ("eval-E02", E, "        return actual >= n\n", "        return actual > n\n", EVAL),
    ("eval-E03", E, '"\\n".join(lines[:-1]).strip(), "\\n".join(lines[1:-1])',
     '"\\n".join(lines[:-2]).strip(), "\\n".join(lines[1:-1])', EVAL),
    ("eval-E04", E, "return any(c.strip() and check(c, **kwargs) for c in candidates)",
     "return any(check(c, **kwargs) for c in candidates)", EVAL),
    ("eval-E05", E, "if i in (0, len(pieces) - 1):\n                count -= 1",
     "if i == 0:\n                count -= 1", EVAL),
    ("eval-E06", E, "    if nth_paragraph > count:\n", "    if nth_paragraph >= count:\n", EVAL),
    ("eval-E07", E, "    return len(single) + len(double)\n", "    return len(single)\n", EVAL),
    ("eval-E08", E, 'for c in "abcdefghijklmnopqrstuvwxyz") > 13',
     'for c in "abcdefghijklmnopqrstuvwxyz") >= 13', EVAL),
    ("eval-E09", E, 'pattern = r"\\s*p\\.\\s?s\\..*$"', 'pattern = r"\\s*p\\.\\s?s.*$"', EVAL),
    ("eval-E10", E, 're.findall(r"^\\s*\\*[^\\*].*$", r, flags=re.MULTILINE)',
     're.findall(r"^\\s*\\*.*$", r, flags=re.MULTILINE)', EVAL),
    ("eval-E11", E, 'section_spliter.strip() + r"\\s?\\d+\\s?", r)) - 1 >= num_sections',
     'section_spliter.strip() + r"\\s?\\d+\\s?", r)) >= num_sections', EVAL),
    ("eval-E12", E, 'r.strip().strip(\'"\').lower().endswith(end_phrase',
     "r.strip().lower().endswith(end_phrase", EVAL),
    ("eval-E13", E, "    if n_latin * 2 < n_other:\n", "    if n_latin < n_other:\n", EVAL),
    ("eval-E14", E, "share[max(votes, key=votes.get)] += len(part)", "share[max(votes, key=votes.get)] += 1", EVAL),
    ("eval-E15", E, 'if script == "latin" and len(words) <= 3 and',
     'if script == "latin" and len(words) < 3 and', EVAL),
    ("eval-E16", E, "    return any(t.sentbreak for t in toks[:-1])\n",
     "    return any(t.sentbreak for t in toks)\n", EVAL),
    ("eval-E17", E, "        if (typ, next_typ) in _PUNKT_COLLOCATIONS:",
     "        if (next_typ, typ) in _PUNKT_COLLOCATIONS:", EVAL),
    ("eval-E18", E, "    if tok.first_lower:\n        return False\n",
     '    if tok.first_lower:\n        return "unknown"\n', EVAL),
    ("eval-E19", E, "        count += word and not inside\n", "        count += word\n", EVAL),
    # eval.py, scoring: IFEval levels, TRACE / CFBench (CSR, ISR, PSR), compare tables
    ("eval-E20", E, 'report[f"instruction_level_{mode}"] = sum(verdicts) / len(verdicts) if verdicts else None',
     'report[f"instruction_level_{mode}"] = sum(verdicts) / len(prompts) if verdicts else None', EVAL),
    ("eval-E21", E, 'report[f"per_type_{mode}"] = {i: sum(v) / len(v) for',
     'report[f"per_type_{mode}"] = {i: sum(v) / len(verdicts) for', EVAL),
    ("eval-E22", E, 'check_instruction(i, kw, response, loose=mode == "loose")',
     'check_instruction(i, kw, response, loose=mode == "strict")', EVAL),
    ("eval-E23", E, "            psr_i = float(csr_i > 0.8)\n", "            psr_i = float(csr_i >= 0.8)\n", EVAL),
    ("eval-E24", E, "        if not all(primary):\n", "        if not any(primary):\n", EVAL),
    ("eval-E25", E, "        isr.append(float(csr_i == 1.0))\n", "        isr.append(float(csr_i > 0.5))\n", EVAL),
    ("eval-E26", E, 'multi = [r["follow_all"] for r in rows if r["constraints_num"] > 1]',
     'multi = [r["follow_all"] for r in rows if r["constraints_num"] >= 1]', EVAL),
    ("eval-E27", E, '"follow_all": all(verdicts),', '"follow_all": any(verdicts),', EVAL),
    ("eval-E28", E, '"priorities": [s.get("priority", "primary") for s in checks],',
     '"priorities": [s.get("priority", "secondary") for s in checks],', EVAL),
    ("eval-E29", E, 'rows.setdefault(report.get("label", "?"), {}).update(report.get("metrics", {}))',
     'rows[report.get("label", "?")] = dict(report.get("metrics", {}))', EVAL),
    ("eval-E30", E, '"by_type": {k: {"pass": _share(v), "n": len(v)}',
     '"by_type": {k: {"pass": _share(v), "n": sum(v)}', EVAL),
    # trace_gen.py, constraint checkers and word / sentence counting
    ("eval-T01", G, 'return p["lo"] <= count_words(r) <= p["hi"]', 'return p["lo"] <= count_words(r) < p["hi"]', EVAL),
    ("eval-T02", G, '        return count_words(r) <= p["n"]\n', '        return count_words(r) < p["n"]\n', EVAL),
    ("eval-T03", G, 'return len(split_sentences(r)) >= p["n"]', 'return len(split_sentences(r)) > p["n"]', EVAL),
    ("eval-T04", G, 'all(count_words(s) <= p["max_len"] for s in split_sentences(r))',
     'all(count_words(s) < p["max_len"] for s in split_sentences(r))', EVAL),
    ("eval-T05", G, 'TOKEN_RE = re.compile(r"\\S*[A-Za-z0-9\\u00c0-\\u024f]\\S*")',
     'TOKEN_RE = re.compile(r"\\S+")', EVAL),
    ("eval-T06", G, 'SENT_SPLIT_RE = re.compile(r"(?<=[.!?])\\s+|\\n+")',
     'SENT_SPLIT_RE = re.compile(r"(?<=[.!])\\s+|\\n+")', EVAL),
    ("eval-T07", G, 'if any(a in prose.lower() for a in ("p.s.", "e.g.", "i.e.")):',
     'if any(a in prose.lower() for a in ("p.s.", "e.g.")):', EVAL),
    ("eval-T08", G, 'return count_word(r, p["topic"]) >= p["k"]', 'return count_word(r, p["topic"]) > p["k"]', EVAL),
    ("eval-T09", G, 'return sum(1 for w in p["words"] if has_word(r, w)) >= p["k"]',
     'return sum(1 for w in p["words"] if has_word(r, w)) > p["k"]', EVAL),
    ("eval-T10", G, 'return sum(1 for m in re.findall(r"\\*\\*([^\\n*]+)\\*\\*", r) if m.strip()) >= p["k"]',
     'return sum(1 for m in re.findall(r"\\*\\*([^\\n*]+)\\*\\*", r) if m.strip()) > p["k"]', EVAL),
    ("eval-T11", G, '        return len(self.pattern.findall(r)) == p["n"]\n',
     '        return len(self.pattern.findall(r)) >= p["n"]\n', EVAL),
    ("eval-T12", G, 'return r == (r.lower() if p["case"] == "lower" else r.upper())',
     'return r == (r.upper() if p["case"] == "lower" else r.lower())', EVAL),
    ("eval-T13", G, "return m is not None and m.start() == 0 and m.group(0).lower()",
     "return m is not None and m.group(0).lower()", EVAL),
    ("eval-T14", G, 'return not leaked and low.count(p["mask"].lower()) >= len(p["secrets"])',
     'return not leaked and low.count(p["mask"].lower()) >= 1', EVAL),
    ("eval-T15", G, '        pos = pos if p["order"] == "given" else pos[::-1]\n', "        pos = pos\n", EVAL),
    ("eval-T16", G, "return min(firsts) >= 0 and all(a < b", "return min(firsts) > 0 and all(a < b", EVAL),
    ("eval-T17", G, 'return bool(_line_starts(re.split(r"\\n\\s*\\n", r.strip())[-1], p["marker"]))',
     'return bool(_line_starts(re.split(r"\\n\\s*\\n", r.strip())[0], p["marker"]))', EVAL),
    ("eval-T18", G, "if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), str):",
     "if isinstance(obj, dict) and isinstance(next(iter(obj.values()), None), str):", EVAL),
    ("eval-T19", G, "    if not response.strip():\n        return False\n    try:", "    try:", EVAL),
    ("eval-T20", G, "if b and (a[1] < b[0] or b[1] < a[0]):", "if b and (a[1] <= b[0] or b[1] <= a[0]):", EVAL),
    ("eval-T21", G, '(not same_family and fam.slot in ("wrapper", "ending", "list"))',
     '(not same_family and fam.slot in ("wrapper", "list"))', EVAL),
    ("eval-T22", G, 'return "," not in r\n\n    def write(self, d, p):\n        d.no_comma',
     'return ";" not in r\n\n    def write(self, d, p):\n        d.no_comma', EVAL),
    # trace_gen.py, IOPO quadruples (ADD / DELETE / REVISE), DPO losers, revision bounds
    ("eval-T23", G, "            if new is None or check(new, y1):\n", "            if new is None:\n", EVAL),
    ("eval-T24", G, "and not satisfies([specs2[at]] + specs2, y1) and not satisfies([old] + specs, y2):",
     "and not satisfies([specs2[at]] + specs2, y1):", EVAL),
    ("eval-T25", G, "specs2, at = specs[:i] + [new] + specs[i + 1:], i",
     "specs2, at = specs[:i] + [new] + specs[i:], i", EVAL),
    ("eval-T26", G, "        if not satisfies(spoil + specs, y):\n", "        if not satisfies(spoil, y):\n", EVAL),
    ("eval-T27", G, "specs2 = renumber([dict(s) for s in specs2])\n        y2 = write_response(ctx, specs2)",
     "specs2 = renumber([dict(s) for s in specs2])\n        y2 = write_response(ctx, specs)", EVAL),
    ("eval-T28", G, '        lo = p["hi"] + rng.randrange(10, 40, 5)\n',
     '        lo = p["lo"] + rng.randrange(10, 40, 5)\n', EVAL),
    ("eval-T29", G, 'return "!" not in r and not CONTRACTION_RE.search(r)',
     "return not CONTRACTION_RE.search(r)", EVAL),
    ("eval-T30", G, 'return sum(1 for line in r.split("\\n") if line.lstrip(" \\"").startswith("## ")) == p["n"]',
     'return sum(1 for line in r.split("\\n") if line.lstrip(" \\"").startswith("##")) == p["n"]', EVAL),
    # model.py, Config.from_hf / to_hf: defaults as transformers fills them, windows, RoPE fields, round trip
    ("model-C1", M, 'rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))',
     'rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 1000000.0)))', MODEL),
    ("model-C2", M, 'hf.get("partial_rotary_factor", 1.0)) != 1.0:',
     'hf.get("partial_rotary_factor", 1.0)) > 1.0:', MODEL),
    ("model-C3", M, 'if rope_type == "default" and "factor" in rope:',
     'if rope_type == "default" and "factor" in hf:', MODEL),
    ("model-C4", M,
     'rope_scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))',
     'rope_scaling.setdefault("original_max_position_embeddings", 8192)', MODEL),
    ("model-C5", M, 'if not hf.get("use_sliding_window", False):', 'if not hf.get("use_sliding_window", True):', MODEL),
    ("model-C6", M, 'max_window_layers = hf.get("max_window_layers", 28)',
     'max_window_layers = hf.get("max_window_layers", 0)', MODEL),
    ("model-C7", M, '        elif model_type == "llama":\n            window = None\n', "", MODEL),
    ("model-C8", M, "if window is not None and i >= max_window_layers else",
     "if window is not None and i > max_window_layers else", MODEL),
    ("model-C9", M, 'num_key_value_heads=hf.get("num_key_value_heads") or heads,',
     'num_key_value_heads=hf.get("num_key_value_heads") or 1,', MODEL),
    ("model-C10", M, 'tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),',
     'tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),', MODEL),
    ("model-C11", M, 'or "float32").removeprefix("torch."),', 'or "float32"),', MODEL),
    ("model-C12", M, "return self.sliding_window is not None and i >= self.max_window_layers",
     "return self.sliding_window is not None and i > self.max_window_layers", MODEL),
    ("model-C13", M, "        else:\n            hf.update(sliding_window=self.sliding_window)\n        return hf",
     "        return hf", MODEL),
    ("model-C14", M, "hf.update(attention_bias=self.attention_bias, mlp_bias=False)",
     "hf.update(mlp_bias=False)", MODEL),
    ("model-C15", M, "                      max_window_layers=self.max_window_layers)",
     "                      )", MODEL),
    ("model-C16", M,
     "if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window < 1):",
     "if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window < 0):",
     MODEL),
    ("model-C17", M, "missing = [k for k in ROPE_FIELDS[kind] if not isinstance",
     "missing = [k for k in ROPE_FIELDS[kind][:1] if not isinstance", MODEL),
    ("model-C18", M, '"tie_word_embeddings": self.tie_word_embeddings,', '"tie_word_embeddings": False,', MODEL),
    ("model-E1", M, '                eos_token_id=hf.get("eos_token_id"),',
     '                eos_token_id=(lambda e: e[0] if isinstance(e, list) else e)(hf.get("eos_token_id")),', MODEL),
    # model.py, load_model: shard index, tied head copy, dtypes, tie_weights, single file over index, eval mode
    ("model-L1", M, "            if not isinstance(shard, str) or Path(shard).name != shard:",
     "            if not isinstance(shard, str):", MODEL),
    ("model-L2", M, "            for name in (n for n, f in where.items() if f == file and n not in present):",
     "            for name in ():", MODEL),
    ("model-L3", M, '        where.pop("lm_head.weight", None)  #', "        pass  #", MODEL),
    ("model-L4", M, "        dtype = SAFETENSORS_FLOATS.get(stored, torch.float32)",
     "        dtype = torch.float32", MODEL),
    ("model-L5", M, "state[name] = t.to(device=device, dtype=dtype)", "state[name] = t.to(device=device)", MODEL),
    ("model-L6", M, "    model.load_state_dict(state, strict=True, assign=True)\n    model.tie_weights()",
     "    model.load_state_dict(state, strict=True, assign=True)", MODEL),
    ("model-L7", M, '    config.torch_dtype = str(dtype).removeprefix("torch.")\n    return model.eval()',
     "    return model.eval()", MODEL),
    ("model-L8", M,
     'with safe_open(where["model.embed_tokens.weight"], framework="pt") as f:\n'
     '            stored = f.get_slice("model.embed_tokens.weight").get_dtype()',
     'with safe_open(where[min(where)], framework="pt") as f:\n'
     "            stored = f.get_slice(min(where)).get_dtype()", MODEL),
    ("model-L9", M, "    if (path / WEIGHTS_NAME).is_file():  # one file",
     "    if not (path / INDEX_NAME).is_file():  # one file", MODEL),
    ("model-L10", M, "    return model.eval()\n\n\ndef save_model", "    return model\n\n\ndef save_model", MODEL),
    # model.py, Tokenizer: eos / pad defaults, generation_config eos list, family detection, Llama 3.1 date
    ("model-T1", M, "            self.eos_token_id = gen_eos[0]", "            self.eos_token_id = gen_eos[-1]", MODEL),
    ("model-T2", M, 'if "<|start_header_id|>" in template or (not template and vocab_has("<|start_header_id|>")):',
     'if "<|start_header_id|>" in template:', MODEL),
    ("model-T3", M, "            self.pad_token_id = self.eos_token_id", "            self.pad_token_id = 0", MODEL),
    ("model-T4", M, "        if self.eos_token_id is None:\n            self.eos_token_id = self.end_of_turn_id\n",
     "", MODEL),
    ("model-T5", M, 'date = datetime.date.today().strftime("%d %b %Y")',
     'date = datetime.date.today().strftime("%d %B %Y")', MODEL),
    ("model-T6", M, 'date = LLAMA31_DATE.search(template).group(1) if LLAMA31_DATE.search(template) else "26 Jul 2024"',
     'date = "26 Jul 2024"', MODEL),
    ("model-T7", M, "gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])",
     "gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])[:1]", MODEL),
    ("model-T8", M, 'if self.family == "llama3" and "Cutting Knowledge Date" in template:',
     'if self.family == "llama3":', MODEL),
    ("model-T9", M, '            token = token.get("content") if isinstance(token, dict) else token\n', "", MODEL),
    ("model-T10", M,
     "        self.eos_token_ids = list(dict.fromkeys(\n"
     "            i for i in [self.eos_token_id, *gen_eos, self.end_of_turn_id] if i is not None))",
     "        self.eos_token_ids = [i for i in [self.eos_token_id, *gen_eos, self.end_of_turn_id] if i is not None]",
     MODEL),
    # model.py, sampling and generate: top-p, temperature, left padding, stop at eos, train/eval mode
    ("model-S1", M, "        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)",
     "        probs = sorted_probs", MODEL),
    ("model-S2", M, "sorted_probs[before >= top_p] = 0.0", "sorted_probs[before > top_p] = 0.0", MODEL),
    ("model-S3", M, "before = sorted_probs.cumsum(-1) - sorted_probs", "before = sorted_probs.cumsum(-1)", MODEL),
    ("model-S4", M, "probs = torch.softmax(logits / temperature, dim=-1)",
     "probs = torch.softmax(logits * temperature, dim=-1)", MODEL),
    ("model-S6", M, "sorted_probs, order = probs.sort(dim=-1, descending=True)",
     "sorted_probs, order = probs.sort(dim=-1)", MODEL),
    ("model-G1", M, "        mask[i, P - len(p):] = 1", "        mask[i, :] = 1", MODEL),
    ("model-G2", M, "    n = 0\n    for n in bar:", "    for n in bar:", MODEL),
    ("model-G4", M, "    for row in out[:, :n + 1].tolist():", "    for row in out[:, :n].tolist():", MODEL),
    ("model-G5", M, "        results.append(row[:stop])", "        results.append(row[:stop + 1])", MODEL),
    ("model-G6", M, "    model.train(was_training)\n", "", MODEL),
    ("model-G9", M, "    eos = torch.tensor(sorted(set(eos_token_ids or [])), dtype",
     "    eos = torch.tensor(sorted(set(eos_token_ids or []))[:1], dtype", MODEL),
    ("model-G10", M, "        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)",
     "        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)", MODEL),
    ("model-G3", M, "    generator = seed if isinstance(seed, torch.Generator) else (",
     "    generator = torch.Generator(device=device).manual_seed(seed.initial_seed()) if isinstance(seed, "
     "torch.Generator) else (", "tests/test_eval.py"),
    ("model-G7", M, "    cache = KVCache(model, B, P + max_new_tokens) if use_cache else None",
     "    cache = KVCache(model, B, P + max_new_tokens - 1) if use_cache else None",
     "tests/test_model.py tests/test_eval.py"),
    ("model-G8", M, "        token = torch.where(done, torch.full_like(token, pad_token_id), token)\n",
     "", "tests/test_model.py tests/test_eval.py"),
    # bench.py, FLOPs and attention pairs
    ("model-B1", B, "(c.num_attention_heads * 2 + c.num_key_value_heads * 2)",
     "(c.num_attention_heads * 2 + c.num_key_value_heads)", MODEL),
    ("model-B2", B, '    tokens = int(batch["attention_mask"].sum())',
     '    tokens = batch["attention_mask"].numel()', MODEL),
    ("model-B3", B, "    hd = c.head_dim or c.hidden_size // c.num_attention_heads",
     "    hd = c.hidden_size // c.num_attention_heads", MODEL),
    ("model-B4", B, "return float(((x + a) ** 2 / 2 + b * x + b ** 2 / 2).sum())",
     "return float(((x + a) ** 2 / 2 + b * (x + a) + b ** 2 / 2).sum())", MODEL),
    ("model-B5", B, "    return float((n ** 2 / 2).sum())", "    return float((n * (n + 1) / 2).sum())", MODEL),
    ("model-B6", B, "    k = 4 if lora else 6", "    k = 6 if lora else 4", MODEL),
    ("model-B7", B, '    scored = len(batch["scored_index"])', "    scored = tokens", MODEL),
    ("model-B8", B, "    attention = 3 * 4 * _attention_pairs(batch)",
     "    attention = 2 * 4 * _attention_pairs(batch)", MODEL),
    ("model-B9", B, "+ b * x + b ** 2 / 2).sum())", "+ b * x + b * (b + 1) / 2).sum())", MODEL),
    # iopo.py, save_checkpoint / load_adapters / load_trainer_state: re-save, adapter keys, sampler, RNG, step
    ("ckpt-C2", I, 'for k, v in model.state_dict().items() if ".lora_" in k}',
     'for k, v in model.state_dict().items() if ".lora_A" in k}', CKPT),
    ("ckpt-C3", I, 'state = {"step": step, "sampler"', 'state = {"step": step - 1, "sampler"', CKPT),
    ("ckpt-C4", I, "    if path.exists():  # re-saving", "    if False:  # re-saving", CKPT),
    ("ckpt-C6", I, 'if unexpected or any(".lora_" in k for k in missing):', "if unexpected:", CKPT),
    ("ckpt-C8", I, "opt_state.setdefault(int(i), {})[name] = t", "opt_state.setdefault(i, {})[name] = t", CKPT),
    ("ckpt-C9", I, '    sampler.load_state_dict(state["sampler"])\n', "", CKPT),
    ("ckpt-C10", I, '    torch.set_rng_state(tensors["rng.torch"])\n', "", CKPT),
    ("ckpt-C12", I, '    return state["step"]\n\n\ndef whole_optimizer_state',
     '    return state["step"] + 1\n\n\ndef whole_optimizer_state', CKPT),
    ("ckpt-C16", I, "source = resume_dir if resume_dir is not None and not cfg.lora_rank else cfg.model",
     "source = cfg.model", CKPT),
    # iopo.py, checkpoints(): order by step, skip incomplete folders, latest, keep_checkpoints pruning
    ("ckpt-C17", I, "    return sorted(found, key=_step_of)", "    return sorted(found)", CKPT),
    ("ckpt-C18", I, 'if _step_of(p) is not None and (p / "trainer_state.json").is_file()]',
     "if _step_of(p) is not None]", CKPT),
    ("ckpt-C19", I, "    return found[-1]", "    return found[0]", CKPT),
    ("ckpt-C21", I, "for old in checkpoints(out)[:-cfg.keep_checkpoints]:",
     "for old in checkpoints(out)[cfg.keep_checkpoints:]:", CKPT),
    # iopo.py, resolve_resume / check_settings / stale_outputs / start_log
    ("ckpt-R1", I, '    if typed.get("lr") == 0:\n        typed["lr"] = default_lr(cfg.method)\n', "", CKPT),
    ("ckpt-R2", I, "{**saved, **{k: getattr(cfg, k) for k in given if k in HOW_TO_RUN},",
     "{**{k: getattr(cfg, k) for k in given if k in HOW_TO_RUN}, **saved,", CKPT),
    ("ckpt-R3", I, '"out": cfg.out, "resume": cfg.resume})', '"out": saved["out"], "resume": cfg.resume})', CKPT),
    ("ckpt-R4", I, "{**saved, **{k: getattr(cfg, k) for k in given if k in HOW_TO_RUN},",
     "{**saved, **{k: getattr(cfg, k) for k in given},", CKPT),
    ("ckpt-R6", I, '    return cfg, resume_dir, state["step"]', "    return cfg, resume_dir, 0", CKPT),
    ("ckpt-K1", I, "or (cfg.eval_size and not cfg.eval_every and not resuming)",
     "or (cfg.eval_size and not cfg.eval_every)", CKPT),
    ("ckpt-K2", I, "if not cfg.beta > 0 or not 0 <= cfg.label_smoothing < 0.5:",
     "if not cfg.beta >= 0 or not 0 <= cfg.label_smoothing < 0.5:", CKPT),
    ("ckpt-K3", I, "if not cfg.beta > 0 or not 0 <= cfg.label_smoothing < 0.5:",
     "if not cfg.beta > 0 or not 0 <= cfg.label_smoothing <= 0.5:", CKPT),
    ("ckpt-K4", I, "if not 0 <= cfg.warmup_ratio <= 1:", "if not 0 <= cfg.warmup_ratio < 1:", CKPT),
    ("ckpt-S1", I, "for old in checkpoints(out) if _step_of(old) > resume_step]",
     "for old in checkpoints(out) if _step_of(old) >= resume_step]", CKPT),
    ("ckpt-S2", I, "if resume_dir is not None and out.resolve() == resume_dir.parent.resolve():",
     "if resume_dir is not None and out == resume_dir.parent:", CKPT),
    ("ckpt-L2", I, "if n == len(lines):  # a last line", "if n >= len(lines) - 1:  # a last line", CKPT),
    # iopo.py, the reference log-prob cache and the held-out loss
    ("ckpt-F1", I, 'weights = sorted(Path(cfg.model).glob("model*.safetensors"))',
     'weights = sorted(Path(cfg.model).glob("model.safetensors"))', CKPT),
    ("ckpt-F3", I, "if table.shape != (n, k)", "if table.shape[0] != n", CKPT),
    ("ckpt-F4", I, "if not torch.isfinite(table).all() else None",
     "if not torch.isfinite(table).any() else None", CKPT),
    ("ckpt-F5", I, "if resume_dir is not None and not lora:  # the policy has moved",
     "if False:  # the policy has moved", CKPT),
    ("ckpt-F6", I, "        with adapters_disabled(model):\n            ref_all = reference_logps(",
     "        with contextlib.nullcontext():\n            ref_all = reference_logps(", CKPT),
    ("ckpt-F7", I, "return sums.view(SEQS_PER_EXAMPLE[cfg.method], -1).T",
     "return sums.view(-1, SEQS_PER_EXAMPLE[cfg.method])", CKPT),
    ("ckpt-E1", I, "weight = 1 if sft else len(idx)", "weight = 1", CKPT),
    ("ckpt-E2", I, 'count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if sft else len(idx)',
     'count += int((batch["labels"] != IGNORE_INDEX).sum()) if sft else len(idx)', CKPT),
    ("ckpt-E4", I, "                ref_held = ref_all[heldout.indices]",
     "                ref_held = ref_all[:len(heldout)]", CKPT),
    ("ckpt-E5", I, "ref = pin(ref_all[[train_set.indices[p] for p in mine]])", "ref = pin(ref_all[mine])", CKPT),
    ("ckpt-E7", I,
     "row.update(evaluate_loss(scorer, heldout, ref_held, cfg, device, autocast))\n            model.train()",
     "model.train()\n            row.update(evaluate_loss(scorer, heldout, ref_held, cfg, device, autocast))", CKPT),
    # data.py, BatchSampler state (resume mid-epoch)
    ("ckpt-B1", D,
     "            self.position += 1  # counted before the yield: the caller holds this batch from now on\n"
     "            yield batches[self.position - 1]",
     "            yield batches[self.position]\n            self.position += 1", CKPT_DATA),
    ("ckpt-B2", D, 'for key in ("n", "batch_size", "seed", "shuffle", "drop_last", "group_by_length"):',
     'for key in ("n", "batch_size", "seed", "shuffle", "drop_last"):', CKPT_DATA),
    ("ckpt-B3", D, 'self.epoch, self.position = state["epoch"], state["position"]',
     'self.epoch, self.position = state["epoch"], state["position"] - 1', CKPT_DATA),
    ("ckpt-B4", D, 'self.epoch, self.position = state["epoch"], state["position"]',
     'self.position = state["position"]', CKPT_DATA),
    # model.py, save_model: stale weights, config.json last, generation_config kept, failed save, move order
    ("ckpt-M1", M, "            stale.unlink(missing_ok=True)  # weights of an earlier save",
     "            pass  # weights of an earlier save", CKPT_MODEL),
    ("ckpt-M2", M, 'key=lambda f: f.name == "config.json"):  # config.json last',
     'key=lambda f: f.name != "config.json"):  # config.json last', CKPT_MODEL),
    ("ckpt-M3", M, '        if not (stage / "generation_config.json").exists():\n', "        if True:\n", CKPT_MODEL),
    ("ckpt-M4", M, "    except BaseException:\n        shutil.rmtree(stage, ignore_errors=True)\n        raise",
     "    except BaseException:\n        raise", CKPT_MODEL),
    ("ckpt-M7", M,
     "    for name in weights:\n"
     "        os.replace(stage / name, path / name)\n"
     '    for stale in [path / WEIGHTS_NAME, path / INDEX_NAME, *path.glob("model-*-of-*.safetensors")]:\n'
     "        if stale.name not in weights:\n            stale.unlink(missing_ok=True)",
     '    for stale in [path / WEIGHTS_NAME, path / INDEX_NAME, *path.glob("model-*-of-*.safetensors")]:\n'
     "        stale.unlink(missing_ok=True)\n    for name in weights:\n        os.replace(stage / name, path / name)",
     CKPT_MODEL),
    # iopo.py, DDP / FSDP on two processes: resume, shared reference pass (one test_scale case each, by parameter id)
    ("ckpt-D1", I, "    with torch.random.fork_rng(devices=[]):  # add_lora draws A matrices",
     "    with contextlib.nullcontext():  # add_lora draws A matrices",
     "tests/test_scale.py -k 'test_ddp_resume_continues_the_run and True'"),
    ("ckpt-D2", I, 'torch.set_rng_state(tensors[f"rng.cpu.rank{rank}"])',
     'torch.set_rng_state(tensors["rng.cpu.rank0"])',
     "tests/test_scale.py -k 'test_ddp_resume_continues_the_run and False'"),
    ("ckpt-D3", I, "table[r::world] = part[:len(range(r, len(dataset), world))]",
     "table[r::world] = part[-len(range(r, len(dataset), world)):]",
     "tests/test_scale.py -k 'test_reference_pass_is_shared and False'"),
    ("ckpt-D4", I, 'whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in s.items()}',
     'whole = {k: v.to_local() if hasattr(v, "full_tensor") else v for k, v in s.items()}',
     "tests/test_scale.py -k 'test_fsdp_resume_continues_the_run and 0'"),
]

# Survivors by design: the mutant cannot change anything the code promises.
EQUIVALENT = {
    "data-M14": "positions counted from the padded start: RoPE sees only position differences within a row, "
                "and the padding is masked",
    "data-M28": "a finished row's later tokens are cut at its first eos and rows never see each other (as model-G8)",
    "eval-T23": "a shortcut only: the check after it (y1 must not satisfy the added constraint) rejects the same "
                "candidate",
    "eval-T26": "write_response keeps every constraint outside spoil, so y fails spoil + specs exactly when it "
                "fails spoil",
    "model-G7": "the last sampled token is never fed back, so the cache needs P + max_new_tokens - 1 slots at most",
    "model-G8": "a finished row's later tokens are cut at its first eos and rows never see each other",
    "ckpt-E2": "a row's first label is always a prompt token (IGNORE_INDEX), so counting it or not is the same",
}


def copy_tree(dest):
    """The git-tracked files as they are in the working tree, with ../shared beside them as the tests expect."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, names.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree stays out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    if (REPO.parent / "shared").exists():
        (dest.parent / "shared").symlink_to((REPO.parent / "shared").resolve())


def pytest(selection, cwd):
    """(pytest's exit status or None on a timeout, the first failing test)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(selection)]
    # no .pyc: a mutant of the original's size, written within the same second, could run from a stale cache
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out = p.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the whole group: the DDP / FSDP tests start workers of their own
        p.communicate()
        return None, ""
    failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return p.returncode, failed[0].split(" - ")[0] if failed else ""


def table_problems():
    ids = [m[0] for m in MUTANTS]
    seen = collections.Counter(ids)
    return ([f"{i}: id used {n} times" for i, n in seen.items() if n > 1]
            + [f"{i}: in EQUIVALENT but not in MUTANTS" for i in EQUIVALENT if i not in seen]
            + [f"{m[0]}: old and new are the same" for m in MUTANTS if m[2] == m[3]])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these ids (fnmatch patterns allowed: 'ckpt-*')")
    ap.add_argument("--list", action="store_true", help="print the mutants and their pytest selections, run nothing")
    ap.add_argument("--check", action="store_true", help="only check that each old text occurs exactly once")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or any(fnmatch.fnmatchcase(m[0], p) for p in args.only)]
    unknown = [p for p in args.only or [] if not any(fnmatch.fnmatchcase(m[0], p) for m in MUTANTS)]
    if unknown:
        ap.error(f"no mutant matches {' '.join(unknown)} (see --list)")
    if args.list:
        for mid, file, _, _, selection in chosen:
            print(f"{mid:<12} {file:<13} {selection}{'  [equivalent]' if mid in EQUIVALENT else ''}")
        return 0
    if args.check:
        bad = table_problems() + [f"{mid}: old text found {(REPO / f).read_text().count(old)} times in {f}"
                                  for mid, f, old, _, _ in chosen if (REPO / f).read_text().count(old) != 1]
        print("\n".join(bad) or f"{len(chosen)} mutants, each applies exactly once")
        return 1 if bad else 0

    status = {}
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        work = Path(tmp) / "repo"
        copy_tree(work)
        for selection in dict.fromkeys(m[4] for m in chosen):  # a failing baseline would "kill" every mutant
            rc, first = pytest(selection, work)
            if rc != 0:
                print(f"without any mutant, pytest {selection} ends with status {rc} {first}: fix that first")
                return 2
        for mid, file, old, new, selection in chosen:
            path, t0, first = work / file, time.time(), ""
            source = path.read_text()
            if source.count(old) != 1:
                status[mid] = "does-not-apply"
            else:
                path.write_text(source.replace(old, new))
                try:
                    rc, first = pytest(selection, work)
                finally:
                    path.write_text(source)
                # 2: the mutant broke collection (an import); 5 would mean the selection matched no test
                status[mid] = {None: "timeout", 0: "survived", 1: "killed", 2: "killed"}.get(rc, f"error-{rc}")
            print(f"{mid:<12} {status[mid]:<15} {time.time() - t0:4.0f} s  {first.removeprefix('FAILED ')}",
                  flush=True)

    counts = collections.Counter(s if s in ("killed", "survived") else "unsettled" for s in status.values())
    unexpected = [i for i, s in status.items() if s == "survived" and i not in EQUIVALENT]
    killed_equivalent = [i for i, s in status.items() if s == "killed" and i in EQUIVALENT]
    unsettled = [f"{i} ({s})" for i, s in status.items() if s not in ("killed", "survived")]
    print(f"\n{len(status)} mutants: {counts['killed']} killed, {counts['survived']} survived "
          f"({counts['survived'] - len(unexpected)} of them equivalent), {counts['unsettled']} unsettled")
    print("unexpected survivors:", " ".join(unexpected) or "none")
    print("equivalent but killed (drop from EQUIVALENT?):", " ".join(killed_equivalent) or "none")
    print("does not apply / timeout / error:", " ".join(unsettled) or "none")
    return 1 if unexpected or unsettled else 0


if __name__ == "__main__":
    sys.exit(main())
