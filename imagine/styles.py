"""AUTOMATIC1111's prompt styles: named pieces of prompt and negative prompt kept in a CSV file (its styles.csv:
columns `name`, `prompt`, `negative_prompt`; older files call the prompt column `text`), applied to a request's
texts before anything reads them, so a style may hold emphasis, prompt editing or `<lora:...>` tags.

A style's text is merged into the prompt as A1111's `merge_prompts` does: where it holds `{prompt}` the prompt goes
there, else the two are joined with ", " (either one empty: the other alone, stripped). Several styles apply in the
order named, each to the result of the one before. The PNG's parameters carry the merged texts, as A1111's do."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """One style's text merged into a prompt (A1111's rule)."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: list[PromptStyle]) -> tuple[str, str]:
    """The prompt and negative prompt with `styles` merged in, in order."""
    for style in styles:
        prompt = merge_prompts(style.prompt, prompt)
        negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


def read_styles(path: str | os.PathLike) -> dict[str, PromptStyle]:
    """A styles CSV -> {name: style}, in the file's order, read as A1111 reads it: spaces after a comma skipped
    (`name, prompt, negative_prompt` is a header too), rows without a name or whose name starts with # skipped, a
    name given twice keeping its last row. A missing file, or one without a name and a prompt (or text) column, is a
    clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"styles file not found: {path} (give AUTOMATIC1111's styles.csv: columns name, "
                                "prompt, negative_prompt)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            fields = [(n or "").strip() for n in reader.fieldnames or []]
            reader.fieldnames = fields
            if "name" not in fields or not {"prompt", "text"} & set(fields):
                raise ValueError(f"{path}: a styles CSV needs a header row with 'name' and 'prompt' columns (and "
                                 f"'negative_prompt'); got {fields}")
            styles = {}
            for row in reader:
                name = (row.get("name") or "").strip()
                if name and not name.startswith("#"):
                    prompt = row.get("prompt") if row.get("prompt") is not None else row.get("text")
                    styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")
            return styles
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable styles CSV ({e})") from None


def pick_styles(available: dict[str, PromptStyle], names: list[str]) -> list[PromptStyle]:
    """The styles `names` asks for, in order; a name not among them is an error naming the ones there are (A1111
    passes over an unknown name; here a typo does not silently change nothing)."""
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"no style named {', '.join(map(repr, missing))}; styles: "
                         f"{', '.join(available) or 'none (give a styles CSV)'}")
    return [available[n] for n in names]
