// A small Markdown renderer for the chat page: the CommonMark blocks and inlines that model answers use (fenced and
// indented code, ATX and setext headings, lists, block quotes, rules, GFM tables, code spans, emphasis,
// strikethrough, links and autolinks, hard breaks), written to give the same HTML as markdown-it
// (tests/test_web_page.py compares the two). Safety: every piece of the source is HTML-escaped before any tag is
// made; the only tags are the fixed ones below, and a link keeps its URL only for http, https, mailto or a
// relative address. Not covered: raw HTML (shown as text, as markdown-it does with html off), entity references,
// reference-style links, images.
"use strict";
(function (global) {
  const ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"};
  const esc = (s) => s.replace(/[&<>"]/g, (c) => ESCAPES[c]);

  // -- inlines ---------------------------------------------------------------------------------------------------
  // Finished HTML is held aside as \u0001N\u0002 so that later rules cannot look inside it (these two characters
  // are removed from the source first).
  function inline(src) {
    const held = [];
    const hold = (html) => "\u0001" + (held.push(html) - 1) + "\u0002";
    // Code spans first: a run of n backticks up to the next run of exactly n; newlines become spaces, and one space
    // is stripped from each end when both ends have one (CommonMark 6.1).
    let s = src.replace(/(?<!`)(`+)(?!`)([\s\S]*?[^`])\1(?!`)/g, (m, ticks, code) => {
      code = code.replace(/\n/g, " ");
      if (/^ [\s\S]* $/.test(code) && /[^ ]/.test(code)) code = code.slice(1, -1);
      return hold("<code>" + esc(code) + "</code>");
    });
    s = s.replace(/\\([!-/:-@[-`{-~])/g, (m, c) => hold(esc(c)));  // backslash escapes: the character itself
    s = esc(s);
    s = s.replace(/&lt;((?:https?|mailto):[^\s<>]*?)&gt;/gi, (m, url) => hold(`<a href="${url}">${url}</a>`));
    s = s.replace(/\[([^\]\n]*)\]\(([^\s()]*)(?:\s+&quot;([^\n]*?)&quot;)?\)/g, (m, text, url, title) => {
      const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(url);
      if (scheme && !/^(https?|mailto)$/i.test(scheme[1])) return m;  // javascript:, data:, ... stay text
      return hold(`<a href="${url}"${title !== undefined ? ` title="${title}"` : ""}>${emphasis(text)}</a>`);
    });
    s = emphasis(s);
    s = s.replace(/(?: {2,}|\\)\n/g, "<br>\n").replace(/ +\n/g, "\n");
    while (s.includes("\u0001")) s = s.replace(/\u0001(\d+)\u0002/g, (m, k) => held[Number(k)]);
    return s;
  }

  // Emphasis by delimiter pairs: an opener is followed by a non-space, a closer preceded by one; `_` never opens or
  // closes inside a word (snake_case stays as it is). Longest delimiters first.
  function emphasis(s) {
    const word = "[\\p{L}\\p{N}_]";
    return s
      .replace(/\*\*\*(?=\S)([\s\S]*?\S)\*\*\*/g, "<em><strong>$1</strong></em>")
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(new RegExp(`(?<!${word})__(?=\\S)([\\s\\S]*?\\S)__(?!${word})`, "gu"), "<strong>$1</strong>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<s>$1</s>")
      .replace(/\*(?=[^\s*])([\s\S]*?[^\s*])\*/g, "<em>$1</em>")
      .replace(new RegExp(`(?<!${word})_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?!${word})`, "gu"), "<em>$1</em>");
  }

  // -- blocks ----------------------------------------------------------------------------------------------------
  const FENCE = /^( {0,3})(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const SETEXT = /^ {0,3}(=+|-+)[ \t]*$/;
  const QUOTE = /^ {0,3}> ?/;
  const ITEM = /^( {0,3})([-*+]|(\d{1,9})[.)])(?:( {1,4})(?! )|( *)$|( {5,}))/;
  const DELIM_ROW = /^ {0,3}\|?(?:[ \t]*:?-+:?[ \t]*\|)*[ \t]*:?-+:?[ \t]*\|?[ \t]*$/;
  const blank = (line) => /^[ \t]*$/.test(line);
  const indentOf = (line) => /^ */.exec(line)[0].length;

  // Does `line` start a block that ends a paragraph? (An ordered list interrupts one only when it starts at 1, and
  // an empty item never does: CommonMark 5.2.)
  function interrupts(line) {
    if (FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)) return true;
    const m = ITEM.exec(line);
    return Boolean(m && m[5] === undefined && (m[3] === undefined || m[3] === "1"));
  }

  function cells(line) {
    let row = line.trim();
    if (row.startsWith("|")) row = row.slice(1);
    if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
    return row.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
  }

  // Blocks of `lines`, as [{kind: "p", inner} | {kind: "block", html}] and whether a blank line separates two of
  // them (which makes an enclosing list item loose).
  function parse(lines) {
    const out = [];
    let para = [], i = 0, gap = false, sawBlank = false;
    const push = (b) => { if (sawBlank && out.length) gap = true; sawBlank = false; out.push(b); };
    const flush = () => {
      if (!para.length) return;
      const text = para.map((l) => l.replace(/^[ \t]+/, "")).join("\n").replace(/[ \t]+$/, "");
      para = [];
      push({kind: "p", inner: inline(text)});
    };
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (blank(line)) { flush(); sawBlank = true; i++; continue; }
      if (!para.length && indentOf(line) >= 4) {  // indented code
        const code = [];
        while (i < lines.length && (blank(lines[i]) || indentOf(lines[i]) >= 4)) code.push(lines[i++].slice(4));
        while (code.length && blank(code[code.length - 1])) code.pop();
        push({kind: "block", html: "<pre><code>" + esc(code.join("\n") + "\n") + "</code></pre>\n"});
        continue;
      }
      if ((m = FENCE.exec(line))) {
        flush();
        const indent = m[1].length, marker = m[2], lang = m[3];
        const close = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}[ \\t]*$`);
        const code = [];
        for (i++; i < lines.length && !close.test(lines[i]); i++) {
          code.push(lines[i].replace(new RegExp(`^ {0,${indent}}`), ""));
        }
        // A fence left open runs to the end of the text (as while an answer streams), without a last newline.
        const text = i < lines.length ? code.map((l) => l + "\n").join("") : code.join("\n");
        i++;
        const cls = lang ? ` class="language-${esc(lang.replace(/\\([!-/:-@[-`{-~])/g, "$1"))}"` : "";
        push({kind: "block", html: `<pre><code${cls}>` + esc(text) + "</code></pre>\n"});
        continue;
      }
      if ((m = HEADING.exec(line))) {
        flush();
        const n = m[1].length;
        push({kind: "block", html: `<h${n}>${inline(m[2] || "")}</h${n}>\n`});
        i++;
        continue;
      }
      if (para.length && (m = SETEXT.exec(line))) {
        const n = m[1][0] === "=" ? 1 : 2;
        const text = para.map((l) => l.trim()).join("\n");
        para = [];
        push({kind: "block", html: `<h${n}>${inline(text)}</h${n}>\n`});
        i++;
        continue;
      }
      if (RULE.test(line)) { flush(); push({kind: "block", html: "<hr>\n"}); i++; continue; }
      if (line.includes("|") && i + 1 < lines.length && DELIM_ROW.test(lines[i + 1]) &&
          cells(line).length === cells(lines[i + 1]).length) {
        flush();
        const aligns = cells(lines[i + 1]).map((c) => c.startsWith(":") && c.endsWith(":") ? "center" :
          c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : "");
        const row = (tag, values) => "<tr>\n" + aligns.map((a, k) =>
          `<${tag}${a ? ` style="text-align:${a}"` : ""}>${inline(values[k] || "")}</${tag}>\n`).join("") + "</tr>\n";
        let html = "<table>\n<thead>\n" + row("th", cells(line)) + "</thead>\n";
        const body = [];
        for (i += 2; i < lines.length && !blank(lines[i]) && !interrupts(lines[i]); i++) {
          body.push(row("td", cells(lines[i])));
        }
        if (body.length) html += "<tbody>\n" + body.join("") + "</tbody>\n";
        push({kind: "block", html: html + "</table>\n"});
        continue;
      }
      if (QUOTE.test(line)) {
        flush();
        const inner = [];
        while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ""));
        push({kind: "block", html: "<blockquote>\n" + html(parse(inner).blocks, false) + "</blockquote>\n"});
        continue;
      }
      if ((m = ITEM.exec(line)) && !(para.length && !interrupts(line))) {
        flush();
        const list = parseList(lines, i);
        i = list.next;
        push({kind: "block", html: list.html});
        continue;
      }
      para.push(line);
      i++;
    }
    flush();
    return {blocks: out, gap};
  }

  // One list from lines[start]: items of the same bullet (or the same ordered delimiter), each item's lines with its
  // content indent removed and parsed as blocks. Tight lists drop the <p> around their paragraphs.
  function parseList(lines, start) {
    const first = ITEM.exec(lines[start]);
    const ordered = first[3] !== undefined;
    const kind = ordered ? first[2].slice(-1) : first[2];
    const items = [];
    let i = start, loose = false;
    while (i < lines.length) {
      const m = ITEM.exec(lines[i]);
      if (!m || (m[3] !== undefined) !== ordered || (ordered ? m[2].slice(-1) : m[2]) !== kind) break;
      if (items.length && items[items.length - 1].trailingBlank) loose = true;
      const marker = m[1].length + m[2].length;
      const width = m[4] !== undefined ? m[4].length : 1;  // 5+ spaces: the content is indented code after one
      const indent = marker + width;
      const body = [m[5] !== undefined ? "" : lines[i].slice(indent)];
      for (i++; i < lines.length; i++) {
        const l = lines[i];
        if (blank(l)) { body.push(""); continue; }
        if (indentOf(l) >= indent) { body.push(l.slice(indent)); continue; }
        const last = body[body.length - 1];
        // a lazy line: paragraph text continued without the indent
        if (last !== "" && !interrupts(l) && !ITEM.test(l) && !FENCE.test(body[0])) { body.push(l); continue; }
        break;
      }
      let trailingBlank = false;
      while (body.length > 1 && body[body.length - 1] === "") { body.pop(); trailingBlank = true; }
      items.push({body, trailingBlank});
    }
    const parsed = items.map((it) => parse(it.body));
    if (parsed.some((p) => p.gap)) loose = true;
    const tag = ordered ? "ol" : "ul";
    const startAt = ordered ? Number(first[3]) : 1;
    let out = `<${tag}${ordered && startAt !== 1 ? ` start="${startAt}"` : ""}>\n`;
    for (const p of parsed) out += "<li>" + html(p.blocks, !loose, true) + "</li>\n";
    return {html: out + `</${tag}>\n`, next: i};
  }

  // Blocks to HTML, the way markdown-it lays it out: in a tight list item a paragraph is its bare inline content, and
  // a block that opens an item or follows such a paragraph starts on a new line.
  function html(blocks, tight, inItem) {
    let s = "";
    blocks.forEach((b, k) => {
      if (b.kind === "p" && tight) { s += b.inner; return; }
      const body = b.kind === "p" ? `<p>${b.inner}</p>\n` : b.html;
      if (inItem && (k === 0 || (tight && blocks[k - 1].kind === "p"))) s += "\n";
      s += body;
    });
    return s;
  }

  function renderMarkdown(src) {
    const lines = String(src).replace(/[\u0001\u0002]/g, "").replace(/\r\n?/g, "\n").split("\n");
    return html(parse(lines).blocks, false, false);
  }

  global.renderMarkdown = renderMarkdown;
})(window);
