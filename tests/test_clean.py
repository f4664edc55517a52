"""ingest.clean, rule by rule, on strings copied from ../shared/corpus (source noted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.clean import (
    build_vocabulary,
    clean_document,
    clean_text,
    fix_numeric_entities,
    is_page_number_line,
    join_broken_lines,
    normalize_unicode,
    normalize_whitespace,
    remove_boilerplate,
    remove_pdf_artifacts,
    remove_repeated_edge_lines,
)
from ingest.documents import LoadedDocument, Page

# ------------------------------------------------------------------ characters


def test_kangxi_radicals_become_ideographs():
    # chatglm3-multi-gpu-finetune.txt (UTF-8 BOM, text extracted from a PDF)
    raw = "ChatGLM官网出了⼀个基于P-Tuning v2的⽅式微调 同时会在output/路径下会⽣成对应的模型⽂件"
    assert normalize_unicode(raw) == "ChatGLM官网出了一个基于P-Tuning v2的方式微调 同时会在output/路径下会生成对应的模型文件"


def test_full_width_ascii_is_folded_but_chinese_punctuation_kept():
    assert normalize_unicode("ＧＰＵ显存８０Ｇ，够用吗？（够）") == "GPU显存80G，够用吗？（够）"
    # other compatibility characters
    assert normalize_unicode("ﬁle…①") == "file...1"


def test_numeric_entities_left_by_a_scraper():
    # chatglm3-multi-gpu-finetune.txt: the "&" of "&#xff08;" was stripped
    raw = "无论是在单机单卡#xff08;一台机器上只有一块GPU#xff09;还是单机多卡 启动ChatGLM3-6B模型#xff0c;其前置环境"
    assert fix_numeric_entities(raw) == "无论是在单机单卡（一台机器上只有一块GPU）还是单机多卡 启动ChatGLM3-6B模型，其前置环境"
    assert fix_numeric_entities("&#x4e2d;&#25991;") == "中文"
    # ASCII code points in the bare form are left alone (could be code or a colour)
    assert fix_numeric_entities("color: #x41; #fff;") == "color: #x41; #fff;"


def test_cid_placeholders_are_removed():
    # kampo-japanese.pdf, first line
    assert remove_pdf_artifacts("第 ›Ÿ˜(cid:1) 号") == "第 ›Ÿ˜ 号"


def test_whitespace():
    raw = "第一行\r\n第二行\r第三行\u00a0有NBSP\u200b和零宽\ufeff字符   \n\n\n\n\t缩进\t文字\u3000全角空格\x07"
    assert normalize_whitespace(raw) == "第一行\n第二行\n第三行 有NBSP和零宽字符\n\n    缩进 文字 全角空格"


def test_whitespace_keeps_code_alignment():
    # llm-notes.md: nvidia-smi output inside a fenced block keeps its spacing
    raw = "```sh\n|    1   N/A  N/A     38972      C   /usr/bin/python3                68103MiB |\n```\n说明   文字"
    assert normalize_whitespace(raw) == (
        "```sh\n|    1   N/A  N/A     38972      C   /usr/bin/python3                68103MiB |\n```\n说明 文字"
    )


# ------------------------------------------------------------------ line joining


def test_chinese_lines_join_without_spaces():
    # modelarts-training-guide.pdf, page 2 (pdfplumber breaks every ~45 characters)
    raw = (
        "若用户需要自动转换,则在运行脚本,例如0_pl_pretrain_13b.sh中,添加变量CONVERT_MG2HF并赋值\n"
        "TRUE。若用户后续不需要自动转换,则在运行脚本中必须删除CONVERT_MG2HF变量。 Megatron转\n"
        "HuggingFace脚本具体参数如下: --model-type:模型类型。 --save-model-type:输出后权重格式。\n"
        "--load-dir:训练完成后保存的权重路径。 --save-dir:需要填入原始HF模型路径,新权重会存\n"
        "于../Llama2-13B/mg2hg下。"
    )
    assert join_broken_lines(raw) == (
        "若用户需要自动转换,则在运行脚本,例如0_pl_pretrain_13b.sh中,添加变量CONVERT_MG2HF并赋值"
        "TRUE。若用户后续不需要自动转换,则在运行脚本中必须删除CONVERT_MG2HF变量。 Megatron转"
        "HuggingFace脚本具体参数如下: --model-type:模型类型。 --save-model-type:输出后权重格式。\n"
        "--load-dir:训练完成后保存的权重路径。 --save-dir:需要填入原始HF模型路径,新权重会存"
        "于../Llama2-13B/mg2hg下。"
    )


def test_hyphens_inside_identifiers_are_kept():
    # modelarts-training-guide.pdf pages 1, 2 and 7
    assert (
        join_broken_lines("权重文件获取地址 1 llama2 llama2-7b https://huggingface.co/meta-llama/Llama-\n2-7b-chat-hf 2 llama2-13b")
        == "权重文件获取地址 1 llama2 llama2-7b https://huggingface.co/meta-llama/Llama-2-7b-chat-hf 2 llama2-13b"
    )
    assert (
        join_broken_lines("--target-tensor-parallel-size:任务不同调整参数target-\ntensor-parallel-size,默认为1。")
        == "--target-tensor-parallel-size:任务不同调整参数target-tensor-parallel-size,默认为1。"
    )
    assert (
        join_broken_lines("此处可以自己定义一个容器名称,例如sdxl-\ndiffusers。 --device=/dev/davinci3:挂载主机")
        == "此处可以自己定义一个容器名称,例如sdxl-diffusers。 --device=/dev/davinci3:挂载主机"
    )
    # a split shell variable and a split option
    assert join_broken_lines("修改davinci后数字可以更改挂载卡。 ${image_name} 代表 $\n{image_name}。") == (
        "修改davinci后数字可以更改挂载卡。 ${image_name} 代表 ${image_name}。"
    )
    assert join_broken_lines("启动失败会有对应的error提示。 docker run -\nitd --device=/dev/davinci6") == (
        "启动失败会有对应的error提示。 docker run -itd --device=/dev/davinci6"
    )


def test_english_lines_join_with_a_space_and_hyphenated_words_rejoin():
    raw = "The FAA proposes to require operators to install updated erro-\nneous software on\nevery affected airplane."
    assert join_broken_lines(raw) == (
        "The FAA proposes to require operators to install updated erroneous software on every affected airplane."
    )
    # federal-register-2020-17221.pdf: a compound split at its own hyphen
    raw = "flight crew procedures for the landing and the non-\nlanding configurations of the airplane"
    assert join_broken_lines(raw) == "flight crew procedures for the landing and the non-landing configurations of the airplane"
    # the document's own words decide
    vocabulary = build_vocabulary(["a nose-down attitude"])
    raw = "repeated airplane nose-\ndown trim of the horizontal stabilizer"
    assert join_broken_lines(raw, vocabulary) == "repeated airplane nose-down trim of the horizontal stabilizer"


def test_markdown_structure_stays_on_its_own_lines():
    # llm-notes.md
    raw = (
        "**好处**\n\n"
        "- 减少内存，显存，存储占用：FP16的位宽是FP32的一半，因此权重等参数所占用的内存也是原来的一半。\n"
        "- 计算效率更高：使用FP16的执行运算性能比FP32更加快\n"
        "- 降低功耗\n\n"
        "1. 解释模型：LORA可以帮助我们更好地理解深度神经网络模型的内部工作机制\n"
        "2. 特征选择：通过计算每个输入特征的重要性权重\n\n"
        "# 常用命令\n\n"
        "```sh\n"
        "sudo nethogs ens3\n"
        "\n"
        "conda create -n wenda python=3.10.9\n"
        "conda activate wenda\n"
        "```\n"
        "| 精度 | 位宽 |\n"
        "| FP16 | 16 |"
    )
    assert join_broken_lines(raw) == raw


def test_paragraph_breaks_titles_and_sentence_ends_are_kept():
    raw = "华为云用户手册\n\n支持的模型列表 本方案支持以下模型的训练,如表1所示。\n表1 支持的模型列表 序号 支持模型"
    assert join_broken_lines(raw) == raw


def test_numbers_at_line_start_are_not_list_items():
    # modelarts-training-guide.pdf, page 3 (a table flowed into text)
    raw = "表示训练中所有机器一个step所处理的样本量。 TP 8 表示张量并行。 PP 1 表示流水线并行。 LR\n2.5e-5 学习率设置。 MIN_LR 2.5e-6 最小学习率设置。"
    assert join_broken_lines(raw) == raw.replace("LR\n2.5e-5", "LR 2.5e-5")


def test_list_item_continuation_lines_join():
    raw = "- 加快通讯效率：针对分布式训练，特别是在大模型训练的过程中，通讯的开销\n  制约了网络模型训练的整体性能。\n- 降低功耗"
    assert join_broken_lines(raw) == "- 加快通讯效率：针对分布式训练，特别是在大模型训练的过程中，通讯的开销制约了网络模型训练的整体性能。\n- 降低功耗"


def test_table_rows_are_not_joined():
    # nics-background-checks-2015-11.pdf
    raw = "Alabama 3,066 58 27,316 18,917 1,031\nAlaska 160 3 2,916 3,154 190\nArizona 2,926 0 16,062 10,536 1,167"
    assert join_broken_lines(raw) == raw


def test_one_line_paragraphs_are_not_joined():
    # rwkv-lora-finetune.txt: the whole article is one line, then its source URL
    article = "由于业务采用的ChatGLM模型推理成本太大了希望降低模型推理成本。" * 20 + "参考文章 RWKV语言模型从入门到放弃保姆级Training、Fine-tuning、Lora入坑教程"
    raw = f"{article}\nhttp://www.dnsts.com.cn/news/49900.html"
    assert join_broken_lines(raw) == raw


# ------------------------------------------------------------------ boilerplate


def test_page_number_lines():
    for line in ["- 1", "- 3333", "12", "第 3 页", "第3页", "3 / 57", "Page 4 of 57", "- 4 -"]:
        assert is_page_number_line(line), line
    for line in ["- 降低功耗", "qwen1.5-110b - - 8 128", "“-”表示不支持", "1. 解释模型", "2021年3月31日"]:
        assert not is_page_number_line(line), line


def test_page_number_runs_are_removed():
    # modelarts-training-guide.pdf, page 60 (and 3,300 more such lines before it)
    raw = "- 3327\n- 3328\n- 3329\n- 3330\n- 3331\n- 3332\n- 3333\n- 3333\n推荐文章"
    assert remove_boilerplate(raw) == ""
    # modelarts-inference-guide.pdf, page 10: the pager's total and ellipsis go too
    raw = "图1 静态benchmark测试结果(示意图)\n共100000条\n- 1\n- ...\n- 2\n- 3\n- 4\n- 5"
    assert remove_boilerplate(raw) == "图1 静态benchmark测试结果(示意图)"


def test_short_number_lists_and_non_sequential_numbers_are_kept():
    assert remove_boilerplate("步骤如下：\n- 1\n- 2\n然后继续。") == "步骤如下：\n- 1\n- 2\n然后继续。"
    assert remove_boilerplate("温度记录\n37\n12\n95\n41") == "温度记录\n37\n12\n95\n41"


def test_navigation_crumb_is_removed():
    # rwkv-lora-finetune.txt and chatglm3-multi-gpu-finetune.txt, first lines
    raw = "当前位置: 首页 > news >正文\n\n制作网站公司图片如何建设网站使用"
    assert remove_boilerplate(raw) == "制作网站公司图片如何建设网站使用"
    assert remove_boilerplate("首页 > 技术 > 大模型\n正文。") == "正文。"


RWKV_TAIL = (
    "lora在快速验证模型基本效果的效率上非常高。 参考文章 RWKV语言模型从入门到放弃保姆级Training、Fine-tuning、Lora入坑教程\n"
    "http://www.dnsts.com.cn/news/49900.html\n\n"
    "相关文章:\n\n"
    "  • apache搭建网站阿里云域名注册查询\n"
    "  • 网站设计和管理容易吗wordpress进入仪表盘\n"
    "  • 新增备案网站在线设计平台设计师招募\n"
    "  • 做网站毕业答辩问题深圳网站建设公司乐云seo\n"
    "  • 公司手机网站模板免费下载建设网站翻译英文\n"
    "  • 西宁网站十大免费cad网站入口软件\n"
    "  • 网站美工设计收费怎么用ai做企业网站框架\n"
    "  • editplus怎么创网站wordpress js 插件开发\n"
    "  • 沈阳做网站汕头seo推广"
)


def test_related_article_list_is_removed():
    # rwkv-lora-finetune.txt, end of file
    assert remove_boilerplate(RWKV_TAIL) == (
        "lora在快速验证模型基本效果的效率上非常高。 参考文章 RWKV语言模型从入门到放弃保姆级Training、Fine-tuning、Lora入坑教程\n"
        "http://www.dnsts.com.cn/news/49900.html"
    )


def test_trailing_scraped_link_list_without_heading_is_removed():
    without_heading = RWKV_TAIL.replace("相关文章:\n\n", "")
    assert remove_boilerplate(without_heading).endswith("http://www.dnsts.com.cn/news/49900.html")
    # a short "•" list is content
    short = "准备工作：\n  • 安装驱动\n  • 安装Anaconda\n  • 配置VPN"
    assert remove_boilerplate(short) == short


def test_real_short_list_items_are_kept():
    # llm-notes.md: links and short items inside an article
    raw = (
        "各种代理\n\n- [github](https://ghproxy.com/)\n- [docker](https://dockerproxy.com/docs)\n"
        "- [OpenAI](https://www.openai-proxy.com/)\n\n**好处**\n\n- 计算效率更高：使用FP16的执行运算性能比FP32更加快\n- 降低功耗"
    )
    assert remove_boilerplate(raw) == raw
    # modelarts-inference-guide.pdf: a table row with "-" cells and its legend
    raw = "21 qwen1.5-72b 8 8 4 16 22 qwen1.5-110b - - 8 128\n“-”表示不支持"
    assert remove_boilerplate(raw) == raw


def test_bullet_only_lines_become_paragraph_breaks():
    # modelarts-training-guide.pdf, page 1: "-" separates sections
    raw = "华为云用户手册\n-\n支持的模型列表 本方案支持以下模型的训练,如表1所示。"
    assert remove_boilerplate(raw) == "华为云用户手册\n\n支持的模型列表 本方案支持以下模型的训练,如表1所示。"


def test_code_blocks_are_never_boilerplate():
    raw = "```\n- 1\n- 2\n- 3\n相关文章:\n```"
    assert remove_boilerplate(raw) == raw


# ------------------------------------------------------------------ headers and footers

FEDERAL_PAGES = [
    # federal-register-2020-17221.pdf pages 2-4: header with alternating page-number side,
    # and a six-line footer (typesetter slug, then rotated margin text)
    "Federal Register/Vol. 85, No. 152/Thursday, August 6, 2020/Proposed Rules 47699\n"
    "Hatta International Airport in Jakarta, altitude disagree alert,5and may affect and the Ethiopian Civil Aviation\n"
    "Indonesia, resulting in 189 fatalities. the flightcrew’s ability to accomplish Authority (ECAA).\n"
    "Investigation of the accident has been continued safe flight and landing. The data from the flight data\n"
    "VerDate Sep<11>2014 16:21 Aug 05, 2020 Jkt 250001 PO 00000 Frm 00002 Fmt 4702 Sfmt 4702 E:\\FR\\FM\\06AUP1.SGM 06AUP1\n"
    "SLASOPORP\nhtiw\nDORP2X7WSLJKSD\nno\nllebj",
    "47700 Federal Register/Vol. 85, No. 152/Thursday, August 6, 2020/Proposed Rules\n"
    "require operators to conduct an AOA command to move the horizontal Also, as a result of the installation of\n"
    "sensor system test and perform an stabilizer, such that the final horizontal this revised MDS software, operators\n"
    "to parameters such as the airplane’s 10 seconds. emergency conditions, including AFM procedures.\n"
    "VerDate Sep<11>2014 16:21 Aug 05, 2020 Jkt 250001 PO 00000 Frm 00003 Fmt 4702 Sfmt 4702 E:\\FR\\FM\\06AUP1.SGM 06AUP1\n"
    "SLASOPORP\nhtiw\nDORP2X7WSLJKSD\nno\nllebj",
    "Federal Register/Vol. 85, No. 152/Thursday, August 6, 2020/Proposed Rules 47701\n"
    "potential cause for unreliable airspeed information for the flightcrew to use if action to bring the airplanes into\n"
    "condition. The FAA is proposing this AD to operators of affected airplanes that the FAA has\n"
    "klist provides additional control wiring. The FAA proposes this trim wire routing installations.\n"
    "VerDate Sep<11>2014 16:21 Aug 05, 2020 Jkt 250001 PO 00000 Frm 00004 Fmt 4702 Sfmt 4702 E:\\FR\\FM\\06AUP1.SGM 06AUP1\n"
    "SLASOPORP\nhtiw\nDORP2X7WSLJKSD\nno\nllebj",
]


def test_repeated_headers_and_footers_are_removed():
    cleaned = remove_repeated_edge_lines(FEDERAL_PAGES)
    for before, after in zip(FEDERAL_PAGES, cleaned):
        assert after.split("\n") == before.split("\n")[1:4]


@pytest.mark.parametrize("footer", ["{n} / 57", "第 {n} 页", "- {n} -", "{n}", "Page {n} of 57"])
def test_page_number_footers_are_removed(footer):
    bodies = ["模型训练需要准备数据。", "然后配置超参数。", "最后提交训练作业。", "训练完成后转换权重。"]
    pages = [f"昇腾训练指南\n{body}\n{footer.format(n=n)}" for n, body in enumerate(bodies, 4)]
    assert remove_repeated_edge_lines(pages) == bodies


def test_lines_repeated_in_the_body_are_kept():
    first = ["准备数据集。", "配置超参数。", "提交训练作业。", "查看训练日志。"]
    last = ["数据放在OBS桶里。", "学习率设为2.5e-5。", "作业名称自定义。", "日志在ModelArts控制台。"]
    pages = [f"第{n}章\n{a}\n注意：以下命令需要root权限\n{b}\n页脚" for n, (a, b) in enumerate(zip(first, last), 1)]
    # the "注意" line repeats on every page, but in the middle of the pages
    assert remove_repeated_edge_lines(pages) == [f"{a}\n注意：以下命令需要root权限\n{b}" for a, b in zip(first, last)]


def test_single_page_is_left_alone():
    assert remove_repeated_edge_lines(["Official - Subject to Final Review\n正文"]) == ["Official - Subject to Final Review\n正文"]


# ------------------------------------------------------------------ composition


def test_clean_text_composes_the_rules():
    raw = "当前位置: 首页 > news >正文\r\n\r\n⽂本被排版打\n断了，#xff08;括号#xff09;\n- 1\n- 2\n- 3\n"
    assert clean_text(raw) == "文本被排版打断了，（括号）"


def test_clean_document_records_pages():
    doc = LoadedDocument(
        Path("guide.pdf"),
        [
            Page(1, "训练指南\n第一页的正文被排版\n打断了。\n1 / 4"),
            Page(2, "训练指南\n- 1\n- 2\n- 3\n2 / 4"),  # nothing but junk: dropped
            Page(3, "训练指南\n第三页的正文。\n3 / 4"),
            Page(4, "训练指南\n第四页的正文。\n4 / 4"),
        ],
    )
    cleaned = clean_document(doc)
    assert cleaned.text == "第一页的正文被排版打断了。\n\n第三页的正文。\n\n第四页的正文。"
    assert cleaned.page_numbers == [1, 3, 4]
    assert cleaned.page_starts == [0, 15, 24]
    for start, body in zip(cleaned.page_starts, ["第一页", "第三页", "第四页"]):
        assert cleaned.text[start:].startswith(body)
    assert cleaned.pages_between(0, len(cleaned.text)) == (1, 3, 4)
    assert cleaned.pages_between(16, 20) == (3,)


def test_clean_document_for_text_files_has_no_pages():
    cleaned = clean_document(LoadedDocument(Path("a.txt"), [Page(None, "⽂本。\n")]))
    assert cleaned.text == "文本。"
    assert cleaned.page_starts == [] and cleaned.page_numbers == []
    assert cleaned.pages_between(0, 3) == ()


def test_clean_document_of_junk_is_empty():
    doc = LoadedDocument(Path("junk.txt"), [Page(None, "当前位置: 首页 > news >正文\n- 1\n- 2\n- 3\n推荐文章")])
    assert clean_document(doc).text == ""
