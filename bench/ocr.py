"""OCR speed and character accuracy on pages rendered from known Chinese and English text.

    python -m bench.ocr [--pages 4] [--no-write]

Each page of known text is written to a PDF by reportlab (Chinese in the CID font
STSong-Light, English in Helvetica, 12 pt on A4), rendered by pdfium at the
resolution zhiku renders scanned pages at (``ingest.pdf.OCR_DPI``) and read by
``ingest.ocr.read_image``, the function ingest uses. "rotated + noise" is the same
image turned by 2° with Gaussian noise (σ = 20 grey levels) and 0.5 % salt-and-pepper
specks, like a slightly skewed office scan.

Character accuracy is 1 − CER: one minus the edit distance between the recognised
and the known text over the known text's length, both NFKC-normalised (OCR's ASCII
"(" equals the source's "（") with whitespace removed. Pages per second is OCR
alone (the image given, the text returned), on this machine's cores.
Targets (issue 12): Chinese ≥ 0.97 clean, ≥ 0.9 rotated + noise. Results go to
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import unicodedata
from pathlib import Path

from bench.report import markdown_table, write_section

ZH_TEXT = (
    "为进一步规范公司差旅费用管理，提高资金使用效益，根据国家有关财务制度的规定，结合公司实际情况，制定本办法。"
    "本办法适用于公司全体员工因公出差所发生的城市间交通费、住宿费、伙食补助费和市内交通费。"
    "出差人员应当严格按照规定的交通工具等级乘坐交通工具，未按规定等级乘坐的，超支部分由个人自理。"
    "出差人员应当在职级对应的住宿标准限额内选择安全、经济、便捷的宾馆住宿，凭发票据实报销。"
    "伙食补助费按出差自然天数计算，按规定标准包干使用，出差人员在接待单位用餐的，应当向接待单位交纳伙食费。"
    "出差人员应当在出差结束后十个工作日内办理报销手续，报销时应提供出差审批单、机票、车票、住宿发票等凭证。"
    "财务部门应当严格审核差旅费开支，对未经批准出差以及超范围、超标准开支的费用不予报销。"
    "各部门负责人对本部门差旅费的真实性、合规性负责，审计部门定期对差旅费管理情况进行检查。"
    "知识库系统把企业的制度文件、产品手册和会议纪要切分成片段，检索时先召回相关片段，再交给语言模型生成答案。"
    "扫描件和图片中的文字需要先经过光学字符识别，识别结果与文字层一样经过清洗和分块，再写入向量索引。"
    "本办法自印发之日起施行，由财务部负责解释，原有规定与本办法不一致的，以本办法为准。"
) * 2
EN_TEXT = (
    "Retrieval augmented generation answers a question in two steps. First, a retriever finds the passages of "
    "the knowledge base that are most likely to contain the answer, using dense vectors and keyword search. "
    "Second, a language model reads those passages and writes an answer that cites them. The quality of the "
    "answer depends on both steps: a passage that was never retrieved cannot be cited, and a passage with "
    "garbled characters is hard to read for the model as well as for the user. Scanned documents therefore go "
    "through optical character recognition before they are cleaned and split like any other text. Travel "
    "expenses must be claimed within ten working days after the trip, with the approval form, tickets and "
    "hotel invoices attached. The finance department checks every claim against the allowances of the "
    "traveller's grade and refuses costs that exceed them without prior approval. "
) * 2

ZH_CHARS_PER_LINE = 36
EN_CHARS_PER_LINE = 88
LINES_PER_PAGE = 30
NOISE_SIGMA = 20
SPECKS = 0.005
ROTATION_DEGREES = 2.0


def wrap(text: str, width: int, by_words: bool) -> list[str]:
    if not by_words:
        return [text[i : i + width] for i in range(0, len(text), width)]
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines


def pages_of(lang: str, count: int) -> list[list[str]]:
    lines = wrap(ZH_TEXT, ZH_CHARS_PER_LINE, False) if lang == "zh" else wrap(EN_TEXT, EN_CHARS_PER_LINE, True)
    pages = [lines[i : i + LINES_PER_PAGE] for i in range(0, len(lines), LINES_PER_PAGE)]
    return (pages * count)[:count]


def render(lines: list[str], lang: str, folder: Path, dpi: int):
    import pypdfium2
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    font = "Helvetica"
    if lang == "zh":
        font = "STSong-Light"
        if font not in pdfmetrics.getRegisteredFontNames():
            pdfmetrics.registerFont(UnicodeCIDFont(font))
    path = folder / f"page-{lang}.pdf"
    pdf = canvas.Canvas(str(path), pagesize=A4)
    pdf.setFont(font, 12)
    y = A4[1] - 72
    for line in lines:
        pdf.drawString(56, y, line)
        y -= 22
    pdf.showPage()
    pdf.save()
    document = pypdfium2.PdfDocument(path)
    try:
        return document[0].render(scale=dpi / 72).to_pil().convert("RGB")
    finally:
        document.close()


def degrade(image, seed: int):
    """Turned by 2°, Gaussian noise and salt-and-pepper specks: a skewed, dusty scan."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    turned = image.rotate(ROTATION_DEGREES, resample=Image.BICUBIC, expand=True, fillcolor=(255, 255, 255))
    pixels = np.asarray(turned.convert("L"), dtype=np.float32)
    pixels += rng.normal(0, NOISE_SIGMA, pixels.shape)
    specks = rng.random(pixels.shape)
    pixels[specks < SPECKS / 2] = 0
    pixels[specks > 1 - SPECKS / 2] = 255
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")


def normalised(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).split())


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_accuracy(recognised: str, truth: str) -> float:
    truth, recognised = normalised(truth), normalised(recognised)
    return max(0.0, 1 - edit_distance(recognised, truth) / max(len(truth), 1))


def measure(lang: str, variant: str, pages: int, dpi: int) -> dict:
    from ingest.ocr import engine, read_image

    engine()  # loaded once, as in the parsing process; not part of the per-page time
    errors = characters = 0
    seconds = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for number, lines in enumerate(pages_of(lang, pages)):
            image = render(lines, lang, Path(folder), dpi)
            if variant != "clean":
                image = degrade(image, seed=number)
            started = time.perf_counter()
            text = read_image(image)
            seconds += time.perf_counter() - started
            truth = normalised("".join(lines) if lang == "zh" else " ".join(lines))
            errors += edit_distance(normalised(text), truth)
            characters += len(truth)
    return {
        "language": lang,
        "page": variant,
        "pages": pages,
        "characters": characters,
        "character accuracy (1 − CER)": f"{max(0.0, 1 - errors / characters):.3f}",
        "pages/s": f"{pages / seconds:.2f}",
        "s/page": f"{seconds / pages:.2f}",
    }


def main() -> None:
    from ingest.pdf import OCR_DPI

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=4, help="Pages per language and variant.")
    parser.add_argument("--dpi", type=int, default=OCR_DPI, help="Rendering resolution (zhiku's for scanned pages by default).")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/BENCHMARKS.md alone.")
    args = parser.parse_args()
    rows = [measure(lang, variant, args.pages, args.dpi) for lang in ("zh", "en") for variant in ("clean", "rotated 2° + noise")]
    table = markdown_table(rows)
    print(table)
    if not args.no_write:
        body = (
            f"RapidOCR 1.4.4 (PP-OCRv4 zh/en, onnxruntime on the CPU) through `ingest.ocr.read_image`, A4 pages of "
            f"known text (12 pt; Chinese {ZH_CHARS_PER_LINE} characters a line, {LINES_PER_PAGE} lines) rendered at "
            f"{args.dpi} dpi; \"rotated 2° + noise\": turned 2°, Gaussian noise σ = {NOISE_SIGMA}, "
            f"{SPECKS:.1%} salt-and-pepper. Accuracy is 1 − CER over NFKC-normalised text without whitespace. "
            "Targets: Chinese ≥ 0.97 clean, ≥ 0.9 rotated + noise.\n\n" + table
        )
        write_section("ocr", "OCR: pages per second and character accuracy", f"python -m bench.ocr --pages {args.pages}", body)


if __name__ == "__main__":
    main()
