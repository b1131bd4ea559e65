"""PNG plots: training reward curves, emotion trajectories, score distributions.

Each figure is rendered to PNG bytes and written through `rlver_jax.storage`, so an output
path may be local or gs://.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rlver_jax import storage  # noqa: E402

DPI = 110


def _save(fig, out_path: str) -> str:
    storage.write_bytes(out_path, storage.png_bytes(fig, DPI))
    plt.close(fig)
    return out_path


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    kernel = np.ones(window) / window
    head = [values[:i + 1].mean() for i in range(window - 1)]
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_training_curves(records: Sequence[Mapping[str, float]], out_path: str,
                         keys: Sequence[str] = ("reward/mean", "emotion/final_mean",
                                                "turns/mean")) -> str:
    """One panel per metric against step, raw and smoothed."""
    steps = np.array([r["step"] for r in records])
    present = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.6 * len(present)), sharex=True,
                             squeeze=False)
    for ax, key in zip(axes[:, 0], present):
        values = np.array([float(r.get(key, np.nan)) for r in records])
        ax.plot(steps, values, alpha=0.35, label="per step")
        ax.plot(steps, _smooth(values, max(1, len(values) // 10)), label="smoothed")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return _save(fig, out_path)


def plot_emotion_trajectories(dialogues: Sequence[Mapping], out_path: str,
                              title: str = "Emotion per turn") -> str:
    """Emotion after each policy turn, one line per dialogue, with the mean."""
    fig, ax = plt.subplots(figsize=(7, 4))
    longest = 0
    series = []
    for d in dialogues:
        turns = d.get("dialogue", [])
        start = turns[0].get("emotion_before") if turns else None
        ys = ([start] if start is not None else []) + [
            t["emotion_after"] for t in turns if t.get("emotion_after") is not None]
        if ys:
            series.append(ys)
            longest = max(longest, len(ys))
            ax.plot(range(len(ys)), ys, color="tab:blue", alpha=0.2, linewidth=1)
    if series:
        padded = np.full((len(series), longest), np.nan)
        for i, ys in enumerate(series):
            padded[i, :len(ys)] = ys
            padded[i, len(ys):] = ys[-1]  # an ended dialogue keeps its final emotion
        ax.plot(range(longest), np.nanmean(padded, axis=0), color="tab:red", linewidth=2.5,
                label="mean")
        ax.legend(loc="best")
    for level, y in (("A", 70), ("B", 40), ("C", 10)):
        ax.axhline(y, color="grey", linestyle=":", linewidth=0.8)
        ax.text(0, y + 1, level, color="grey", fontsize=8)
    ax.set_xlabel("policy turn")
    ax.set_ylabel("emotion")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_score_distribution(final_emotions: Sequence[float], out_path: str,
                            title: str = "Final emotion") -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(final_emotions, bins=np.arange(0, 105, 5), color="tab:green", edgecolor="white")
    ax.axvline(float(np.mean(final_emotions)), color="tab:red", label="mean")
    ax.set_xlabel("final emotion")
    ax.set_ylabel("dialogues")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out_path)


def plot_breakdown(breakdown: Mapping[str, Mapping[str, float]], out_path: str,
                   title: str = "Final emotion by category") -> str:
    """Horizontal bars of the mean final emotion per category (e.g. hidden need), each
    annotated with its dialogue count and success / failure counts.

    `breakdown` maps a category to a dict with `mean_emotion`, `n`, `success`, `failure`
    (the evaluation report's `by_need` / `by_personality`).
    """
    names = list(breakdown)
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(names), 1) + 1.6))
    if names:
        means = [float(breakdown[k]["mean_emotion"]) for k in names]
        ys = np.arange(len(names))
        ax.barh(ys, means, color="tab:blue", alpha=0.8)
        for y, k, m in zip(ys, names, means):
            row = breakdown[k]
            ax.text(min(m, 100) + 1, y, f"n={row['n']}  S={row['success']}  F={row['failure']}",
                    va="center", fontsize=8)
        ax.set_yticks(ys)
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()  # first category on top
    for y in (10, 40, 70, 100):
        ax.axvline(y, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlim(0, 130)  # room for the count labels right of a bar at 100
    ax.set_xlabel("mean final emotion")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out_path)
