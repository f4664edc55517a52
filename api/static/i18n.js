// Interface strings in Chinese and English; the language comes from the browser, then the toggle.
const STRINGS = {
  zh: {
    chat: "对话", knowledge_bases: "知识库", api_key: "API 密钥", new_chat: "新对话", knowledge_base: "知识库",
    model: "模型", settings: "设置", ask: "输入问题，Enter 发送，Shift+Enter 换行", send: "发送", stop: "停止",
    sources: "来源", no_kb: "（不使用知识库）", copy: "复制", copied: "已复制", page: "第 {n} 页", score: "相关度",
    name: "名称", documents: "文档", chunks: "分块", backend: "存储", create: "创建", new_kb_name: "新知识库名称",
    delete: "删除", open: "打开", confirm_delete_kb: "删除知识库「{name}」及其全部文档？", confirm_delete_doc: "从知识库中删除「{name}」？",
    drop_here: "把文件或文件夹拖到这里上传", choose_files: "选择文件", choose_folder: "选择文件夹",
    search: "检索", search_placeholder: "检索知识库（即对话时模型看到的段落）", document: "文档", status: "状态",
    size: "大小", date: "日期", key_needed: "此服务器需要 API 密钥：", save: "保存", key_invalid: "密钥无效",
    uploading: "上传中", queued: "排队中", running: "处理中", done: "完成", failed: "失败", cancelled: "已取消",
    cancel: "取消", retry: "重试", waiting: "等待", processed: "已处理", ingested: "已入库", unchanged: "未变化",
    skipped: "已跳过", removed: "已移除", ok: "正常", files: "文件", no_results: "没有检索到段落",
    admin_only: "此操作需要管理员密钥", stopped: "（已停止）", empty: "暂无", ocr_pages: "OCR 识别页：{pages}",
  },
  en: {
    chat: "Chat", knowledge_bases: "Knowledge bases", api_key: "API key", new_chat: "New chat", knowledge_base: "Knowledge base",
    model: "Model", settings: "Settings", ask: "Ask a question — Enter sends, Shift+Enter for a new line", send: "Send", stop: "Stop",
    sources: "Sources", no_kb: "(no knowledge base)", copy: "Copy", copied: "Copied", page: "page {n}", score: "score",
    name: "Name", documents: "Documents", chunks: "Chunks", backend: "Store", create: "Create", new_kb_name: "new knowledge base name",
    delete: "Delete", open: "Open", confirm_delete_kb: "Delete knowledge base “{name}” and all its documents?", confirm_delete_doc: "Remove “{name}” from the knowledge base?",
    drop_here: "Drop files or folders here to upload", choose_files: "Choose files", choose_folder: "Choose a folder",
    search: "Search", search_placeholder: "Search the knowledge base (the passages chat would see)", document: "Document", status: "Status",
    size: "Size", date: "Date", key_needed: "This server needs an API key:", save: "Save", key_invalid: "invalid key",
    uploading: "uploading", queued: "queued", running: "running", done: "done", failed: "failed", cancelled: "cancelled",
    cancel: "Cancel", retry: "Retry", waiting: "waiting", processed: "processed", ingested: "ingested", unchanged: "unchanged",
    skipped: "skipped", removed: "removed", ok: "ok", files: "files", no_results: "No passages found",
    admin_only: "This needs an admin key", stopped: "(stopped)", empty: "none yet", ocr_pages: "OCR'd pages: {pages}",
  },
};

let language = localStorage.getItem("zhiku.language")
  || ((navigator.language || "zh").toLowerCase().startsWith("zh") ? "zh" : "en");

export function currentLanguage() { return language; }

export function setLanguage(next) {
  language = next in STRINGS ? next : "en";
  localStorage.setItem("zhiku.language", language);
  applyStaticStrings();
}

export function t(key, values = {}) {
  const text = STRINGS[language][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

export function applyStaticStrings(root = document) {
  document.documentElement.lang = language === "zh" ? "zh-CN" : "en";
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
}
