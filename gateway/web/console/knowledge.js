/* kefu console, Knowledge page: the tenant's documents (upload, status, delete; admins) and a "try a question"
   box (staff). Also renders the sources an AI answer cites (used by the chat view). Static, no dependencies;
   every text from the network is set with textContent, links only for http(s) URLs. */
(function () {
  'use strict';

  var LANG = /^zh/i.test(navigator.language || '') ? 'zh' : 'en';
  var TEXT = {
    en: {
      chats: 'Conversations', tab: 'Knowledge', documents: 'Documents',
      drop: 'Drop files here, or click to choose', formats: 'Markdown, text, HTML, PDF, DOCX, FAQ (JSON or CSV)',
      sourceUrl: 'Source link shown in citations (optional, for the next upload)',
      title: 'Title', status: 'Status', version: 'Version', chunks: 'Chunks', size: 'Size', updated: 'Updated',
      none: 'No documents yet: upload the pages your customers ask about.',
      st_queued: 'queued', st_indexing: 'indexing', st_ready: 'ready', st_failed: 'failed',
      serving: 'version {v} still answers', remove: 'Delete', confirmDelete: 'Delete "{t}"? Answers stop using it at once.',
      uploading: 'Uploading {n}…', uploaded: '{n}: queued for indexing', uploadFailed: '{n}: {m}',
      deleteFailed: 'Delete failed: {m}', listFailed: 'Could not load the documents: {m}',
      tryTitle: 'Try a question', tryHint: 'What the assistant finds in the documents and answers to a visitor.',
      tryPlaceholder: 'A question a customer might ask', ask: 'Ask', asking: 'Searching…',
      answer: 'Answer', passages: 'Retrieved passages', noPassages: 'No passage matches this question.',
      handoff: 'The documents do not answer this: a visitor would be handed to a human agent.',
      sources: 'Sources', score: 'score {s}', agentOnly: 'Documents are managed by an administrator.',
      tryFailed: 'The question failed: {m}'
    },
    zh: {
      chats: '会话', tab: '知识库', documents: '文档', drop: '拖放文件到这里，或点击选择文件',
      formats: 'Markdown、纯文本、HTML、PDF、DOCX、FAQ（JSON 或 CSV）',
      sourceUrl: '引用中显示的来源链接（可选，用于下一次上传）',
      title: '标题', status: '状态', version: '版本', chunks: '分块', size: '大小', updated: '更新时间',
      none: '还没有文档：上传顾客常问的内容吧。',
      st_queued: '排队中', st_indexing: '索引中', st_ready: '可用', st_failed: '失败',
      serving: '版本 {v} 仍在使用', remove: '删除', confirmDelete: '删除“{t}”？回答将立即不再使用它。',
      uploading: '正在上传 {n}…', uploaded: '{n}：已加入索引队列', uploadFailed: '{n}：{m}',
      deleteFailed: '删除失败：{m}', listFailed: '无法加载文档：{m}',
      tryTitle: '试一试', tryHint: '看看助手在文档中找到什么、会如何回答访客。',
      tryPlaceholder: '输入一个顾客可能会问的问题', ask: '提问', asking: '正在检索…',
      answer: '回答', passages: '检索到的段落', noPassages: '没有与这个问题匹配的段落。',
      handoff: '文档中没有答案：访客会被转接给人工客服。',
      sources: '来源', score: '得分 {s}', agentOnly: '文档由管理员维护。', tryFailed: '提问失败：{m}'
    }
  }[LANG];
  var ACTIVE = { queued: true, indexing: true };
  var POLL_MS = 1500;
  var MAX_PAGES = 20;

  function t(key, values) {
    return TEXT[key].replace(/\{(\w+)\}/g, function (_, name) { return String(values && values[name]); });
  }
  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    for (var name in attrs || {}) {
      if (name === 'text') node.textContent = attrs[name];
      else node.setAttribute(name, attrs[name]);
    }
    (children || []).forEach(function (child) { if (child) node.appendChild(child); });
    return node;
  }

  /** The URL when it is http(s), else null: a document's `url` is the uploader's text, never a javascript: link. */
  function safeUrl(url) {
    if (!url) return null;
    try {
      var parsed = new URL(url);
      return parsed.protocol === 'http:' || parsed.protocol === 'https:' ? parsed.href : null;
    } catch (e) { return null; }
  }

  function titleNode(title, url, testid) {
    var href = safeUrl(url);
    var attrs = { text: title };
    if (testid) attrs['data-testid'] = testid;
    if (!href) return el('span', attrs);
    attrs.href = href;
    attrs.target = '_blank';
    attrs.rel = 'noopener noreferrer';
    return el('a', attrs);
  }

  /** "Sources" under an AI message: one entry per cited document, its quote as the tooltip; null when none. */
  function sources(citations, testid) {
    if (!Array.isArray(citations) || !citations.length) return null;
    var list = el('ul', {});
    var seen = {};
    citations.forEach(function (citation) {
      var key = citation.document_id || citation.title;
      if (seen[key]) return;
      seen[key] = true;
      var item = el('li', { 'data-testid': testid, 'data-document-id': citation.document_id || '' },
        [titleNode(citation.title || citation.document_id || '?', citation.url)]);
      if (citation.quote) item.title = citation.quote;
      list.appendChild(item);
    });
    return el('div', { class: 'sources' }, [el('span', { class: 'label', text: TEXT.sources }), list]);
  }

  // ---- state: set by start(), cleared by stop() ---------------------------------------------------------
  var session = null;      // {token, role}
  var expired = null;      // the console's signOut(message)
  var pollTimer = null;
  var listing = 0;         // generation of the newest list request: an older answer is dropped

  function request(method, path, body) {
    var headers = { Authorization: 'Bearer ' + session.token };
    if (body !== undefined && !(body instanceof FormData)) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(body);
    }
    return fetch(path, { method: method, headers: headers, body: body, credentials: 'omit' })
      .then(function (response) {
        if (response.status === 401) { if (expired) expired(); throw new Error('unauthorized'); }
        if (response.status === 204) return null;
        return response.json().catch(function () { return {}; }).then(function (json) {
          if (!response.ok) {
            throw new Error((json && json.error && json.error.message) || ('HTTP ' + response.status));
          }
          return json;
        });
      });
  }

  function isAdmin() { return !!session && session.role === 'admin'; }
  function visible() { return !!session && !$('knowledge').hidden && !document.hidden; }

  // ---- the page and the tabs -----------------------------------------------------------------------------
  function show(knowledge) {
    $('app').classList.toggle('kb-mode', knowledge);
    $('knowledge').hidden = !knowledge;
    $('tab-chats').setAttribute('aria-pressed', String(!knowledge));
    $('tab-knowledge').setAttribute('aria-pressed', String(knowledge));
    if (knowledge && isAdmin()) refresh();
    if (knowledge) $(isAdmin() ? 'kb-file' : 'kb-try-input').focus();
  }

  function start(token, role, onExpired) {
    session = { token: token, role: role };
    expired = onExpired;
    // Agents may ask the try box (search is staff's); listing, uploading and deleting are for admins only.
    var staff = role === 'admin' || role === 'agent';
    $('tab-knowledge').hidden = !staff;
    $('kb-admin').hidden = !isAdmin();
    $('knowledge').classList.toggle('kb-try-only', !isAdmin());
    $('kb-agent-note').hidden = isAdmin();
    $('kb-list').textContent = '';
    $('kb-try-result').hidden = true;
    show(false);
  }

  function stop() {
    session = null;
    clearTimeout(pollTimer);
    listing++;
    $('kb-list').textContent = '';
    $('kb-upload-status').textContent = '';
    show(false);
  }

  // ---- documents -----------------------------------------------------------------------------------------
  function refresh() {
    clearTimeout(pollTimer);
    if (!isAdmin()) return Promise.resolve();
    var generation = ++listing;
    var documents = [];
    function page(cursor, pages) {
      var path = '/v1/knowledge/documents?limit=200' + (cursor ? '&cursor=' + encodeURIComponent(cursor) : '');
      return request('GET', path).then(function (body) {
        documents = documents.concat(body.documents || []);
        if (body.next_cursor && pages < MAX_PAGES) return page(body.next_cursor, pages + 1);
        return documents;
      });
    }
    return page('', 1).then(function (all) {
      if (generation !== listing) return;
      render(all);
      // Refresh while anything is still being indexed, and only while someone looks at the page.
      if (all.some(function (d) { return ACTIVE[d.status]; })) schedule();
    }, function (error) {
      if (generation !== listing || !session) return;
      $('kb-upload-status').textContent = t('listFailed', { m: error.message });
      schedule();
    });
  }

  function schedule() {
    clearTimeout(pollTimer);
    pollTimer = setTimeout(function () { if (visible()) refresh(); }, POLL_MS);
  }

  document.addEventListener('visibilitychange', function () { if (visible() && isAdmin()) refresh(); });

  function formatBytes(n) {
    if (!(n >= 0)) return '';
    if (n < 1024) return n + ' B';
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + ' KiB';
    return (n / 1024 / 1024).toFixed(1) + ' MiB';
  }

  function formatTime(value) {
    var date = new Date(value);
    return isNaN(date.getTime()) ? String(value || '') : date.toLocaleString();
  }

  function render(documents) {
    var list = $('kb-list');
    list.textContent = '';
    $('kb-empty').hidden = documents.length > 0;
    documents.slice().sort(function (a, b) {
      return String(b.updated_at).localeCompare(String(a.updated_at));
    }).forEach(function (d) {
      var status = ['queued', 'indexing', 'ready', 'failed'].indexOf(d.status) >= 0 ? d.status : 'queued';
      var name = d.title || d.filename || d.document_id;
      var titleCell = el('td', { class: 'kb-title' }, [
        titleNode(name, d.url),
        d.filename && d.filename !== name ? el('div', { class: 'kb-sub', text: d.filename }) : null,
        d.error ? el('div', { class: 'kb-error', 'data-testid': 'kb-document-error', text: d.error }) : null
      ]);
      var statusText = TEXT['st_' + status];
      if (status === 'failed' && d.serving_version > 0) statusText += ' · ' + t('serving', { v: d.serving_version });
      var remove = el('button', { type: 'button', class: 'kb-delete', 'data-testid': 'kb-delete', text: TEXT.remove,
        'aria-label': TEXT.remove + ' ' + name });
      remove.addEventListener('click', function () { removeDocument(d.document_id, name); });
      list.appendChild(el('tr', { 'data-testid': 'kb-document', 'data-document-id': d.document_id,
        'data-status': status }, [
        titleCell,
        el('td', {}, [el('span', { class: 'kb-status', 'data-status': status, text: statusText })]),
        el('td', { class: 'num', text: String(d.version || '') }),
        el('td', { class: 'num', text: String(d.chunks || 0) }),
        el('td', { class: 'num', text: formatBytes(d.bytes) }),
        el('td', { text: formatTime(d.updated_at) }),
        el('td', {}, [remove])
      ]));
    });
  }

  function removeDocument(id, name) {
    if (!window.confirm(t('confirmDelete', { t: name }))) return;
    request('DELETE', '/v1/knowledge/documents/' + encodeURIComponent(id)).then(refresh, function (error) {
      $('kb-upload-status').textContent = t('deleteFailed', { m: error.message });
      refresh();
    });
  }

  // ---- upload: the file picker and drag and drop, one file at a time -------------------------------------
  function upload(files) {
    files = Array.prototype.slice.call(files || []);
    if (!files.length || !isAdmin()) return;
    var url = $('kb-url').value.trim();
    var lines = [];
    function note(line) { lines.push(line); $('kb-upload-status').textContent = lines.join('\n'); }
    $('kb-upload-status').textContent = '';
    files.reduce(function (previous, file) {
      return previous.then(function () {
        $('kb-upload-status').textContent = lines.concat([t('uploading', { n: file.name })]).join('\n');
        var form = new FormData();
        form.append('file', file, file.name);
        if (url) form.append('url', url);
        return request('POST', '/v1/knowledge/documents', form).then(function () {
          note(t('uploaded', { n: file.name }));
        }, function (error) {
          note(t('uploadFailed', { n: file.name, m: error.message }));
        }).then(refresh);
      });
    }, Promise.resolve()).then(function () {
      $('kb-file').value = '';
      $('kb-url').value = '';
    });
  }

  $('kb-file').addEventListener('change', function (event) { upload(event.target.files); });
  var drop = $('kb-drop');
  ['dragenter', 'dragover'].forEach(function (type) {
    drop.addEventListener(type, function (event) {
      event.preventDefault();
      if (event.dataTransfer) event.dataTransfer.dropEffect = 'copy';
      drop.classList.add('over');
    });
  });
  ['dragleave', 'dragend'].forEach(function (type) {
    drop.addEventListener(type, function () { drop.classList.remove('over'); });
  });
  drop.addEventListener('drop', function (event) {
    event.preventDefault();
    drop.classList.remove('over');
    upload(event.dataTransfer && event.dataTransfer.files);
  });
  // A file dropped next to the zone would make the browser leave the console to open it.
  ['dragover', 'drop'].forEach(function (type) {
    window.addEventListener(type, function (event) { if (!$('knowledge').hidden) event.preventDefault(); });
  });

  // ---- try a question: the passages retrieval finds, and the answer a visitor would get ------------------
  var asking = 0;
  $('kb-try-form').addEventListener('submit', function (event) {
    event.preventDefault();
    var question = $('kb-try-input').value.trim();
    if (!question || !session) return;
    var generation = ++asking;
    $('kb-try-result').hidden = false;
    $('kb-try-send').disabled = true;
    $('kb-answer').textContent = TEXT.asking;
    $('kb-passages').textContent = '';
    var searched = request('POST', '/v1/knowledge/search', { query: question, k: 5 }).then(function (body) {
      if (generation === asking) showPassages(body.results || []);
    }, function (error) {
      if (generation === asking) $('kb-passages').appendChild(el('li', { class: 'kb-error', text: error.message }));
    });
    var answered = ask(question).then(function (body) {
      if (generation === asking) showAnswer(body);
    }, function (error) {
      if (generation === asking) {
        $('kb-answer').textContent = '';
        $('kb-answer').appendChild(el('p', { class: 'kb-error', text: t('tryFailed', { m: error.message }) }));
      }
    });
    Promise.all([searched, answered]).then(function () { if (generation === asking) $('kb-try-send').disabled = false; });
  });

  function ask(question) {
    // The same turn a visitor's question takes (/v1/chat), in a conversation of its own that is deleted right
    // after, so trying questions leaves nothing in the agents' lists.
    return request('POST', '/v1/chat', { message: question, stream: false }).then(function (body) {
      if (body.session_id) {
        request('DELETE', '/v1/sessions/' + encodeURIComponent(body.session_id)).catch(function () {});
      }
      return body;
    });
  }

  function showPassages(results) {
    var list = $('kb-passages');
    list.textContent = '';
    if (!results.length) list.appendChild(el('li', { class: 'kb-none', text: TEXT.noPassages }));
    results.forEach(function (result) {
      list.appendChild(el('li', { 'data-testid': 'kb-passage', 'data-document-id': result.document_id,
        'data-chunk-id': result.chunk_id }, [
        el('div', { class: 'kb-passage-head' }, [
          titleNode(result.title || result.document_id, result.url),
          el('span', { class: 'kb-score', text: t('score', { s: Number(result.score).toFixed(2) }) })]),
        el('div', { class: 'kb-passage-text', text: result.text })
      ]));
    });
  }

  function showAnswer(body) {
    var box = $('kb-answer');
    box.textContent = '';
    box.setAttribute('data-finish-reason', body.finish_reason || '');
    if (body.finish_reason === 'handoff') {
      box.appendChild(el('p', { class: 'kb-handoff', text: TEXT.handoff }));
    }
    if (body.reply) box.appendChild(el('p', { class: 'kb-reply', text: body.reply }));
    var citations = Array.isArray(body.citations) ? body.citations : [];
    if (!citations.length) return;
    var list = el('ol', { class: 'kb-citations' });
    citations.forEach(function (citation) {
      list.appendChild(el('li', { 'data-testid': 'kb-citation', 'data-document-id': citation.document_id || '',
        'data-chunk-id': citation.chunk_id || '' }, [
        titleNode(citation.title || citation.document_id || '?', citation.url),
        citation.quote ? el('blockquote', { text: citation.quote }) : null
      ]));
    });
    box.appendChild(el('div', { class: 'sources' }, [el('span', { class: 'label', text: TEXT.sources }), list]));
  }

  // ---- texts and tabs ------------------------------------------------------------------------------------
  Array.prototype.forEach.call(document.querySelectorAll('[data-kb-i18n]'), function (node) {
    node.textContent = TEXT[node.getAttribute('data-kb-i18n')];
  });
  Array.prototype.forEach.call(document.querySelectorAll('[data-kb-i18n-placeholder]'), function (node) {
    node.placeholder = TEXT[node.getAttribute('data-kb-i18n-placeholder')];
    node.setAttribute('aria-label', node.placeholder);
  });
  $('tab-chats').addEventListener('click', function () { show(false); });
  $('tab-knowledge').addEventListener('click', function () { show(true); });

  window.kefuKnowledge = { start: start, stop: stop, sources: sources, safeUrl: safeUrl };
})();
