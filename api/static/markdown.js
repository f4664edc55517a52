// A small Markdown renderer that builds DOM nodes and never parses HTML: model output and
// document text only ever become text nodes, so nothing in them can run. Supported:
// fenced code, headings, bullet and numbered lists, paragraphs, `code`, **bold**, *italic*,
// [text](http(s) links) and citations [n] (handed to onCite to make clickable).

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*)|(\[[^\]\n]+\]\([^)\s]+\))|(\[\d+\](?:\[\d+\])*)/g;

function inline(parent, text, onCite) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) parent.append(text.slice(last, match.index));
    const [token] = match;
    if (match[1]) parent.append(element("code", token.slice(1, -1)));
    else if (match[2]) inline(parent.appendChild(document.createElement("strong")), token.slice(2, -2), onCite);
    else if (match[3]) inline(parent.appendChild(document.createElement("em")), token.slice(1, -1), onCite);
    else if (match[4]) parent.append(link(token));
    else for (const n of token.match(/\d+/g)) parent.append(onCite ? onCite(Number(n)) : `[${n}]`);
    last = match.index + token.length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function link(token) {
  const [, label, href] = token.match(/^\[([^\]]+)\]\(([^)]+)\)$/);
  let url;
  try { url = new URL(href); } catch { return token; }
  if (url.protocol !== "http:" && url.protocol !== "https:") return token; // javascript:, data: … stay text
  const a = element("a", label);
  a.href = url.href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  return a;
}

function element(tag, text) {
  const el = document.createElement(tag);
  el.textContent = text;
  return el;
}

export function renderMarkdown(source, onCite) {
  const root = document.createDocumentFragment();
  const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
  let paragraph = [], list = null;
  const flush = () => {
    if (paragraph.length) inline(root.appendChild(document.createElement("p")), paragraph.join("\n"), onCite);
    paragraph = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith("```")) {
      flush(); list = null;
      const code = [];
      while (++i < lines.length && !lines[i].startsWith("```")) code.push(lines[i]);
      root.appendChild(document.createElement("pre")).append(element("code", code.join("\n")));
      continue;
    }
    const heading = line.match(/^(#{1,4})\s+(.*)$/);
    const item = line.match(/^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/);
    if (heading) {
      flush(); list = null;
      inline(root.appendChild(document.createElement(`h${heading[1].length + 2}`)), heading[2], onCite);
    } else if (item) {
      flush();
      const tag = item[1] ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) list = root.appendChild(document.createElement(tag));
      inline(list.appendChild(document.createElement("li")), item[3], onCite);
    } else if (!line.trim()) {
      flush(); list = null;
    } else {
      list = null;
      paragraph.push(line);
    }
  }
  flush();
  return root;
}
