/* kefu chat widget: <script src="//EDGE/widget.js" data-tenant="demo" data-lang="zh|en" data-title="..."
   data-base-url="//EDGE"></script> (data-base-url defaults to where the script came from). One file, no dependencies, no downloads; the UI lives in an open
   shadow root so the host page's CSS cannot reach it. Every text from the network is set with textContent. */
(function () {
  'use strict';
  var script = document.currentScript;
  if (!script || window.__kefuWidget) return;
  window.__kefuWidget = true;

  var data = script.dataset;
  var BASE = (data.baseUrl ? new URL(data.baseUrl, location.href).href : new URL(script.src, location.href).origin)
    .replace(/\/+$/, '');
  var TENANT = data.tenant || 'demo';
  var LANG = data.lang === 'en' || data.lang === 'zh' ? data.lang :
    (/^zh/i.test(navigator.language || '') ? 'zh' : 'en');
  var KEY = 'kefu:' + TENANT + ':' + BASE;
  var MAX_OUTBOX = 50;
  var TYPING_SEND_MS = 3000;
  var TYPING_SHOW_MS = 6000;

  var TEXT = {
    zh: {
      title: '在线客服', open: '打开客服聊天', closeChat: '关闭聊天', placeholder: '输入消息，回车发送',
      send: '发送', human: '转人工', you: '我', ai: 'AI 助手', agent: '客服', system: '系统',
      st_ai: 'AI 助手为您服务', st_waiting: '正在为您转接人工客服…', st_queue: '正在排队，前面还有 {n} 位',
      st_human: '{name} 为您服务', st_closed: '会话已结束，发送消息可重新开始', st_connecting: '正在连接…',
      st_offline: '网络已断开，正在重连…', typing: '{name} 正在输入…', sending: '发送中', failed: '发送失败',
      handoffText: '转人工', welcome: '您好！有什么可以帮您？', agentJoined: '{name} 已接入',
      released: '已转回 AI 助手', closed: '会话已结束', waitingNotice: '已为您转接人工客服，请稍候',
      blocked: '消息包含不允许的内容，未发送', unread: '{n} 条未读消息', log: '聊天记录', sources: '来源'
    },
    en: {
      title: 'Customer service', open: 'Open chat', closeChat: 'Close chat', placeholder: 'Type a message, Enter to send',
      send: 'Send', human: 'Talk to a human', you: 'You', ai: 'AI assistant', agent: 'Agent', system: 'System',
      st_ai: 'AI assistant', st_waiting: 'Connecting you to an agent…', st_queue: 'Waiting for an agent: {n} ahead of you',
      st_human: 'Chatting with {name}', st_closed: 'Conversation closed; send a message to start again',
      st_connecting: 'Connecting…', st_offline: 'Connection lost, reconnecting…', typing: '{name} is typing…',
      sending: 'sending', failed: 'not sent', handoffText: 'I would like to talk to a human agent',
      welcome: 'Hello! How can we help you?', agentJoined: '{name} joined the conversation',
      released: 'You are back with the AI assistant', closed: 'The conversation was closed',
      waitingNotice: 'We are passing you to a human agent, please hold on',
      blocked: 'This message contains words that are not allowed; it was not sent', unread: '{n} unread messages',
      log: 'Chat messages', sources: 'Sources'
    }
  }[LANG];
  var TITLE = data.title || TEXT.title;

  function t(key, values) {
    return TEXT[key].replace(/\{(\w+)\}/g, function (_, name) { return String(values && values[name]); });
  }

  // ---- persistent state: token, visitor id, conversation, last seq, unsent messages --------------------
  var state = load();
  var seqAtLoad = state.lastSeq;  // what this visitor saw before: a replay of it is not unread
  function load() {
    var fallback = { token: null, visitorId: null, conversationId: null, lastSeq: 0, outbox: [], open: false };
    try {
      var stored = JSON.parse(localStorage.getItem(KEY) || 'null');
      if (stored && typeof stored === 'object') {
        for (var name in fallback) if (!(name in stored)) stored[name] = fallback[name];
        if (!Array.isArray(stored.outbox)) stored.outbox = [];
        return stored;
      }
    } catch (e) { /* storage blocked or corrupt: start afresh */ }
    return fallback;
  }
  function save() {
    try { localStorage.setItem(KEY, JSON.stringify(state)); } catch (e) { /* private mode: memory only */ }
  }

  function randomId() {
    var bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ('0' + b.toString(16)).slice(-2); }).join('');
  }

  function tokenExpiry(token) {
    try {
      var part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      return JSON.parse(atob(part + '==='.slice((part.length + 3) % 4))).exp * 1000 || 0;
    } catch (e) { return 0; }
  }

  // ---- DOM ---------------------------------------------------------------------------------------------
  var CSS = [
    // !important on the host: the page's own !important rules (say `* {font-size: 40px !important}`) reach the
    // host element and would be inherited inside; for important rules the shadow tree's win.
    ':host{all:initial!important;display:block!important;position:fixed!important;z-index:2147483000!important;',
    'right:20px!important;bottom:20px!important;color:#1f2328!important;',
    'font:14px/1.45 system-ui,-apple-system,"Segoe UI","PingFang SC","Microsoft YaHei",sans-serif!important}',
    '*{box-sizing:border-box}',
    'button{font:inherit;cursor:pointer}',
    ':focus-visible{outline:2px solid #1b6ef3;outline-offset:2px}',
    '.launcher{width:58px;height:58px;border-radius:50%;border:0;background:#1b6ef3;color:#fff;',
    'box-shadow:0 6px 18px rgba(0,0,0,.25);display:flex;align-items:center;justify-content:center;position:relative}',
    '.launcher svg{width:28px;height:28px;fill:currentColor}',
    '.badge{position:absolute;top:-4px;right:-4px;min-width:20px;height:20px;border-radius:10px;background:#d1242f;',
    'color:#fff;font-size:12px;line-height:20px;padding:0 6px}',
    '.panel{position:absolute;right:0;bottom:72px;width:370px;height:560px;max-height:calc(100vh - 110px);',
    'background:#fff;border-radius:14px;box-shadow:0 12px 40px rgba(0,0,0,.28);display:flex;flex-direction:column;',
    'overflow:hidden}',
    '[hidden]{display:none!important}',
    'header{background:#1b6ef3;color:#fff;padding:12px 14px;display:flex;align-items:center;gap:10px}',
    'header .who{flex:1;min-width:0}',
    'header h2{margin:0;font-size:16px;font-weight:600}',
    '.status{font-size:12px;opacity:.92;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}',
    '.x{background:transparent;border:0;color:#fff;font-size:22px;line-height:1;padding:4px 8px}',
    '.log{flex:1;overflow-y:auto;padding:12px;background:#f6f8fa;display:flex;flex-direction:column;gap:8px}',
    '.msg{max-width:82%;display:flex;flex-direction:column;align-self:flex-start}',
    '.msg .who{font-size:11px;color:#57606a;margin:0 4px 2px}',
    '.msg .text{background:#fff;border:1px solid #d0d7de;border-radius:12px;padding:8px 11px;white-space:pre-wrap;',
    'overflow-wrap:anywhere}',
    '.msg[data-sender=visitor]{align-self:flex-end;align-items:flex-end}',
    '.msg[data-sender=visitor] .text{background:#1b6ef3;color:#fff;border-color:#1b6ef3}',
    '.msg[data-sender=agent] .text{background:#e7f5ec;border-color:#a6dcb9}',
    '.msg[data-sender=system]{align-self:center;max-width:92%}',
    '.msg[data-sender=system] .text{background:transparent;border:0;color:#57606a;font-size:12px;text-align:center}',
    '.msg .meta{font-size:11px;color:#8c959f;margin:2px 4px 0}',
    '.sources{font-size:12px;color:#57606a;margin:3px 4px 0;overflow-wrap:anywhere}',
    '.sources b{font-weight:600;margin-right:4px}',
    '.sources ul{display:inline;list-style:none;margin:0;padding:0}',
    '.sources li{display:inline}',
    '.sources li+li::before{content:" · "}',
    '.sources a{color:#1b6ef3}',
    '.msg[data-pending] .text{opacity:.7}',
    '.msg[data-failed] .meta{color:#d1242f}',
    '.notice{align-self:center;font-size:12px;color:#57606a;text-align:center}',
    '.typing{font-size:12px;color:#57606a;padding:2px 14px;background:#f6f8fa;min-height:20px}',
    'footer{border-top:1px solid #d0d7de;padding:8px;display:flex;flex-direction:column;gap:6px}',
    '.row{display:flex;gap:6px;align-items:flex-end}',
    'textarea{flex:1;resize:none;font:inherit;border:1px solid #d0d7de;border-radius:10px;padding:8px 10px;',
    'max-height:120px;min-height:40px}',
    '.send{background:#1b6ef3;color:#fff;border:0;border-radius:10px;padding:9px 14px}',
    '.human{align-self:flex-start;background:#fff;border:1px solid #d0d7de;border-radius:14px;padding:3px 10px;',
    'font-size:12px;color:#1f2328}',
    '@media (max-width:480px){:host{right:12px!important;bottom:12px!important}',
    '.panel{position:fixed;inset:0;width:auto;height:auto;max-height:none;border-radius:0}',
    '.launcher[aria-expanded=true]{display:none}}'
  ].join('');

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    for (var name in attrs || {}) {
      if (name === 'text') node.textContent = attrs[name];
      else node.setAttribute(name, attrs[name]);
    }
    (children || []).forEach(function (child) { node.appendChild(child); });
    return node;
  }

  // A custom element name, so the page's `div` or `section` rules do not match the host.
  var host = el('kefu-chat', { id: 'kefu-widget' });
  var root = host.attachShadow({ mode: 'open' });
  if ('adoptedStyleSheets' in root && typeof CSSStyleSheet === 'function' && CSSStyleSheet.prototype.replaceSync) {
    // A constructed sheet is not an inline <style>, so a page whose CSP forbids inline styles still works.
    var sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
    root.adoptedStyleSheets = [sheet];
  } else {
    root.appendChild(el('style', { text: CSS }));
  }

  var launcher = el('button', { class: 'launcher', type: 'button', 'data-testid': 'kefu-launcher',
    'aria-label': TEXT.open, 'aria-expanded': 'false', 'aria-controls': 'kefu-panel' });
  var svgNS = 'http://www.w3.org/2000/svg';
  var icon = document.createElementNS(svgNS, 'svg');
  icon.setAttribute('viewBox', '0 0 24 24');
  icon.setAttribute('aria-hidden', 'true');
  var path = document.createElementNS(svgNS, 'path');
  path.setAttribute('d', 'M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2z');
  icon.appendChild(path);
  launcher.appendChild(icon);
  var badge = el('span', { class: 'badge', hidden: '' });
  launcher.appendChild(badge);

  var statusLine = el('div', { class: 'status', 'data-testid': 'kefu-status', 'data-status': 'connecting',
    role: 'status', text: TEXT.st_connecting });
  var closeButton = el('button', { class: 'x', type: 'button', 'aria-label': TEXT.closeChat, text: '×' });
  var log = el('div', { class: 'log', role: 'log', 'aria-live': 'polite', 'aria-label': TEXT.log, tabindex: '0' });
  var typingLine = el('div', { class: 'typing', 'data-testid': 'kefu-typing', 'aria-live': 'polite' });
  var input = el('textarea', { rows: '1', 'data-testid': 'kefu-input', placeholder: TEXT.placeholder,
    'aria-label': TEXT.placeholder, maxlength: '4000' });
  var sendButton = el('button', { class: 'send', type: 'button', 'data-testid': 'kefu-send', text: TEXT.send });
  var humanButton = el('button', { class: 'human', type: 'button', 'data-testid': 'kefu-handoff', text: TEXT.human });
  var panel = el('div', { class: 'panel', id: 'kefu-panel', role: 'dialog', 'aria-label': TITLE, hidden: '' }, [
    el('header', {}, [el('div', { class: 'who' }, [el('h2', { text: TITLE }), statusLine]), closeButton]),
    log, typingLine,
    el('footer', {}, [humanButton, el('div', { class: 'row' }, [input, sendButton])])
  ]);
  root.appendChild(panel);
  root.appendChild(launcher);

  // ---- rendering ---------------------------------------------------------------------------------------
  var seen = {};          // seq -> true: stored events already shown (resume and replays never double them)
  var byMessageId = {};   // message_id -> element (streaming AI answers, messages shown before their seq)
  var byCid = {};         // cid -> element of a message still in the outbox
  var unread = 0;
  var status = { status: 'ai', assignee_name: null, position: null };

  function senderLabel(sender) {
    var type = sender && sender.type;
    if (type === 'visitor') return TEXT.you;
    if (type === 'ai') return TEXT.ai;
    if (type === 'agent') return (sender.name || TEXT.agent);
    return TEXT.system;
  }

  function messageElement(sender, text) {
    var type = sender && ['visitor', 'ai', 'agent', 'system'].indexOf(sender.type) >= 0 ? sender.type : 'system';
    var textNode = el('div', { class: 'text', text: text });
    var node = el('div', { class: 'msg', 'data-testid': 'kefu-message', 'data-sender': type }, [
      el('div', { class: 'who', text: senderLabel(sender) }), textNode, el('div', { class: 'meta' })]);
    return node;
  }

  function place(node, seq) {
    // Keep the log in seq order; nodes without a seq (pending, streaming) stay at the end.
    var stick = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    if (seq !== undefined) {
      node.setAttribute('data-seq', String(seq));
      var children = log.children;
      for (var i = 0; i < children.length; i++) {
        var other = children[i].getAttribute('data-seq');
        if (other === null || Number(other) > seq) { log.insertBefore(node, children[i]); return scroll(stick); }
      }
    }
    log.appendChild(node);
    scroll(stick);
  }
  function scroll(stick) { if (stick) log.scrollTop = log.scrollHeight; }

  function setText(node, text) { node.querySelector('.text').textContent = text; }

  function safeUrl(url) {
    // A document's link is what its uploader typed: only http(s) becomes a link, never javascript: or data:.
    // A path ("/returns") belongs to the shop's own site, the page the widget is embedded in.
    try {
      var parsed = new URL(url, location.href);
      return parsed.protocol === 'http:' || parsed.protocol === 'https:' ? parsed.href : null;
    } catch (e) { return null; }
  }

  function setSources(node, citations) {
    // The documents an AI answer cites, under its text: one entry per document, its quote as the tooltip.
    var old = node.querySelector('.sources');
    if (old) node.removeChild(old);
    if (!Array.isArray(citations) || !citations.length) return;
    var list = el('ul', {});
    var seenDocuments = {};
    citations.forEach(function (citation) {
      var key = citation.document_id || citation.title;
      if (!key || seenDocuments[key]) return;
      seenDocuments[key] = true;
      var href = citation.url ? safeUrl(citation.url) : null;
      var title = String(citation.title || citation.document_id);
      var item = el('li', { 'data-testid': 'kefu-citation', 'data-document-id': citation.document_id || '' }, [
        href ? el('a', { href: href, target: '_blank', rel: 'noopener noreferrer', text: title })
          : el('span', { text: title })]);
      if (citation.quote) item.title = String(citation.quote);
      list.appendChild(item);
    });
    node.insertBefore(el('div', { class: 'sources' }, [el('b', { text: TEXT.sources }), list]),
      node.querySelector('.meta'));
  }
  function setMeta(node, text) { node.querySelector('.meta').textContent = text || ''; }

  function notice(text, seq) {
    // A state change's notice sits at its seq among the messages; the greeting (seq 0) on top.
    var node = el('div', { class: 'notice', 'data-testid': 'kefu-notice', text: text });
    place(node, seq);
    return node;
  }
  var greeting = TEXT.welcome;  // the tenant's own welcome text replaces it when the edge sends one
  var greetingNode = null;

  function showStatus() {
    var code = status.status;
    var text;
    if (!socketReady) { code = everConnected ? 'offline' : 'connecting'; text = TEXT['st_' + code]; }
    else if (code === 'waiting_human') text = status.position ? t('st_queue', { n: status.position }) : TEXT.st_waiting;
    else if (code === 'human') text = t('st_human', { name: status.assignee_name || TEXT.agent });
    else if (code === 'closed') text = TEXT.st_closed;
    else { code = 'ai'; text = TEXT.st_ai; }
    statusLine.textContent = text;
    statusLine.setAttribute('data-status', code);
  }

  function showUnread() {
    badge.hidden = unread === 0;
    badge.textContent = unread > 99 ? '99+' : String(unread);
    launcher.setAttribute('aria-label', unread ? TEXT.open + ' (' + t('unread', { n: unread }) + ')' : TEXT.open);
  }

  // ---- stored events -----------------------------------------------------------------------------------
  function onStored(event) {
    var seq = event.seq;
    if (typeof seq !== 'number') return;
    if (seen[seq]) return;
    seen[seq] = true;
    if (event.conversation_id && event.conversation_id !== state.conversationId) {
      state.conversationId = event.conversation_id;
    }
    if (seq > state.lastSeq) state.lastSeq = seq;
    if (event.type === 'msg') onMessage(event);
    else if (event.type === 'state') onState(event);
    save();
  }

  function onMessage(event) {
    var sender = event.sender || { type: 'system' };
    var node = (event.cid && byCid[event.cid]) || byMessageId[event.message_id];
    if (node) {
      // Our own pending message, or a streamed answer: the stored copy replaces it in place.
      log.removeChild(node);
      node.removeAttribute('data-pending');
      node.removeAttribute('data-streaming');
      node.removeAttribute('data-failed');
      setMeta(node, '');
      setText(node, event.text);
      if (event.cid) { delete byCid[event.cid]; dropFromOutbox(event.cid); }
    } else {
      node = messageElement(sender, event.text);
    }
    if (event.message_id) {
      node.setAttribute('data-message-id', event.message_id);
      delete byMessageId[event.message_id];
    }
    if (sender.type === 'ai') setSources(node, event.citations);
    place(node, event.seq);
    if (sender.type === 'agent' || sender.type === 'ai') hideTyping();
    if (sender.type !== 'visitor' && panel.hidden && event.seq > seqAtLoad) { unread++; showUnread(); }
  }

  var stateSeq = -1;          // seq of the newest state event applied to the status line
  var noticeStatus = 'ai';    // status as the stored state events tell it, for the notices between messages
  function onState(event) {
    var before = noticeStatus;
    noticeStatus = event.status;
    if (event.seq >= stateSeq) {
      stateSeq = event.seq;
      status.status = event.status;
      status.assignee_name = event.assignee_name || event.assignee || null;
      if (event.status !== 'waiting_human') status.position = null;
      showStatus();
    }
    if (before === event.status) return;
    var seq = event.seq;
    if (event.status === 'human') {
      notice(t('agentJoined', { name: event.assignee_name || event.assignee || TEXT.agent }), seq);
    } else if (event.status === 'waiting_human') notice(TEXT.waitingNotice, seq);
    else if (event.status === 'closed') notice(TEXT.closed, seq);
    else if (event.status === 'ai' && before === 'human') notice(TEXT.released, seq);
  }

  function onDelta(event) {
    var node = byMessageId[event.message_id];
    if (!node) {
      if (log.querySelector('[data-message-id="' + cssEscape(event.message_id) + '"]')) return;  // already stored
      node = messageElement({ type: 'ai' }, '');
      node.setAttribute('data-streaming', '');
      node.setAttribute('data-message-id', event.message_id);
      byMessageId[event.message_id] = node;
      place(node);
    }
    var text = node.querySelector('.text');
    text.textContent += event.delta;
    scroll(true);
  }

  function cssEscape(value) {
    return window.CSS && CSS.escape ? window.CSS.escape(value) : String(value).replace(/["\\]/g, '\\$&');
  }

  var typingTimer = null;
  function showTyping(name) {
    typingLine.textContent = t('typing', { name: name || TEXT.agent });
    clearTimeout(typingTimer);
    typingTimer = setTimeout(hideTyping, TYPING_SHOW_MS);
  }
  function hideTyping() { clearTimeout(typingTimer); typingLine.textContent = ''; }

  // ---- outbox: what the visitor typed, kept until the edge acknowledges it -----------------------------
  function dropFromOutbox(cid) {
    state.outbox = state.outbox.filter(function (item) { return item.cid !== cid; });
    save();
  }

  function queueMessage(text) {
    var item = { cid: randomId(), text: text };
    state.outbox.push(item);
    if (state.outbox.length > MAX_OUTBOX) state.outbox.shift();
    save();
    showPending(item);
    flushOutbox();
  }

  function showPending(item) {
    var node = messageElement({ type: 'visitor' }, item.text);
    node.setAttribute('data-pending', '');
    setMeta(node, TEXT.sending);
    byCid[item.cid] = node;
    place(node);
  }

  function flushOutbox() {
    if (!socketReady) return;
    state.outbox.forEach(function (item) {
      if (item.sentOn === connectionNumber) return;  // once per connection; a new one resends (same cid)
      item.sentOn = connectionNumber;
      var frame = { type: 'send', cid: item.cid, text: item.text };
      if (state.conversationId) frame.conversation_id = state.conversationId;
      transmit(frame);
    });
  }

  // ---- connection --------------------------------------------------------------------------------------
  var ws = null;
  var socketReady = false;
  var everConnected = false;
  var connectionNumber = 0;
  var attempt = 0;
  var retryTimer = null;
  var pingTimer = null;
  var lastFrameAt = 0;
  var heartbeatMs = 25000;
  var connecting = false;

  function transmit(frame) {
    if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify(frame)); return true; }
    return false;
  }

  function fetchToken(previous) {
    var headers = { 'Content-Type': 'application/json' };
    if (previous) headers.Authorization = 'Bearer ' + previous;
    return fetch(BASE + '/v1/widget/token', {
      method: 'POST', headers: headers, body: JSON.stringify({ tenant: TENANT }), credentials: 'omit'
    }).then(function (response) {
      if (response.status === 401 && previous) return fetchToken(null);  // too old or forged: a new visitor
      if (!response.ok) throw new Error('widget token: HTTP ' + response.status);
      return response.json().then(function (body) {
        if (body.visitor_id && state.visitorId && body.visitor_id !== state.visitorId) {
          resetConversation();  // a different visitor cannot resume the old one's conversation
        }
        state.token = body.token;
        state.visitorId = body.visitor_id || state.visitorId;
        save();
        return body.token;
      });
    });
  }

  var renewNow = false;  // the edge refused the token (4001): renew it with itself, keeping the visitor
  function validToken() {
    if (state.token && !renewNow && tokenExpiry(state.token) - Date.now() > 60000) {
      return Promise.resolve(state.token);
    }
    renewNow = false;
    return fetchToken(state.token);
  }

  function resetConversation(keepId) {
    if (!keepId) state.conversationId = null;
    state.lastSeq = 0;
    shownSince = false;
    seen = {};
    byMessageId = {};
    stateSeq = -1;
    noticeStatus = 'ai';
    Array.prototype.slice.call(log.children).forEach(function (child) {
      if (!child.hasAttribute('data-pending')) log.removeChild(child);
    });
    save();
  }

  function connect() {
    if (connecting || (ws && ws.readyState <= WebSocket.OPEN)) return;
    clearTimeout(retryTimer);
    connecting = true;
    validToken().then(open, function (error) {
      connecting = false;
      if (window.console) console.warn('kefu:', error.message);
      scheduleReconnect();
    });
  }

  function open(token) {
    var socket = ws = new WebSocket(BASE.replace(/^http/, 'ws') + '/v1/ws');
    connecting = false;
    socket.onopen = function () {
      var hello = { type: 'hello', token: token };
      // A fresh page shows the whole conversation again, so it resumes from the start; a reconnect
      // within the page asks only for what it missed.
      if (state.conversationId) {
        hello.resume = [{ conversation_id: state.conversationId, after_seq: shownSince ? state.lastSeq : 0 }];
      }
      socket.send(JSON.stringify(hello));
    };
    socket.onmessage = function (message) {
      if (socket !== ws) return;
      lastFrameAt = Date.now();
      var frame;
      try { frame = JSON.parse(message.data); } catch (e) { return; }
      handle(frame);
    };
    socket.onclose = function (event) {
      if (socket !== ws) return;
      ws = null;
      socketReady = false;
      clearInterval(pingTimer);
      showStatus();
      if (blocked) return;                                      // refused for good: no retries
      if (event.code === 4001) renewNow = true;                 // expired or revoked: renew, then retry
      if (event.code === 4003) resetConversation();             // not ours (any more): start a new one
      scheduleReconnect(event.code === 4008 ? 10000 : 0);
    };
  }

  var shownSince = false;  // true once this page has shown the conversation from its start

  function handle(frame) {
    switch (frame.type) {
      case 'welcome':
        if (frame.conversation_id && frame.conversation_id !== state.conversationId) {
          // The visitor's open conversation, found by the edge (its events are replayed after this welcome).
          if (state.conversationId) resetConversation();
          state.conversationId = frame.conversation_id;
          save();
        }
        if (frame.greeting) { greeting = frame.greeting; if (greetingNode) greetingNode.textContent = greeting; }
        resyncing = false;
        socketReady = true;
        everConnected = true;
        shownSince = true;
        attempt = 0;
        connectionNumber++;
        (frame.resume || []).forEach(function (result) {
          if (result.result === 'resync') resync();
        });
        if (frame.status) status.status = frame.status;
        heartbeatMs = Math.max(5000, (frame.heartbeat_s || 25) * 1000);
        startPings();
        showStatus();
        flushOutbox();
        break;
      case 'msg': case 'state':
        onStored(frame);
        break;
      case 'note':
        break;  // agents only; never shown to a visitor
      case 'ack':
        if (frame.cid) {
          dropFromOutbox(frame.cid);
          var node = byCid[frame.cid];
          if (node) { setMeta(node, ''); node.removeAttribute('data-pending'); }
        }
        break;
      case 'nack':
        onNack(frame);
        break;
      case 'ai_delta':
        onDelta(frame);
        break;
      case 'typing':
        if (frame.on === false) hideTyping();
        else if (!frame.sender || frame.sender.type !== 'visitor') showTyping(frame.sender && frame.sender.name);
        break;
      case 'queue':
        status.status = 'waiting_human';
        status.position = frame.position;
        showStatus();
        break;
      case 'resync':
        resync();
        break;
      case 'error':
        if (frame.code === 'blocked') blocked = true;
        if (window.console) console.warn('kefu:', frame.code, frame.message);
        break;
    }
  }
  var blocked = false;

  function onNack(frame) {
    var kind = frame.request_type;
    if (frame.cid && byCid[frame.cid]) {
      var retriable = frame.code === 'unavailable' || frame.code === 'rate_limited' || frame.code === 'draining';
      if (retriable) return;  // stays in the outbox; the next connection resends it
      var node = byCid[frame.cid];
      node.setAttribute('data-failed', '');
      node.removeAttribute('data-pending');
      setMeta(node, frame.code === 'content_blocked' ? TEXT.blocked : TEXT.failed);
      delete byCid[frame.cid];
      dropFromOutbox(frame.cid);
      return;
    }
    if (kind === 'handoff' && frame.code === 'not_supported') queueMessage(TEXT.handoffText);
  }

  function startPings() {
    clearInterval(pingTimer);
    lastFrameAt = Date.now();
    pingTimer = setInterval(function () {
      // A socket that has heard nothing for two beats is dead even if TCP has not said so yet.
      if (Date.now() - lastFrameAt > 2 * heartbeatMs + 5000) { if (ws) ws.close(4000, 'heartbeat lost'); return; }
      transmit({ type: 'ping' });
    }, heartbeatMs);
  }

  function scheduleReconnect(minimumMs) {
    clearTimeout(retryTimer);
    // Exponential backoff with full jitter, so a restarted edge is not hit by every widget at once.
    var ceiling = Math.min(30000, 500 * Math.pow(2, attempt));
    attempt = Math.min(attempt + 1, 10);
    var delay = Math.max(minimumMs || 0, Math.round(ceiling / 2 + Math.random() * ceiling / 2));
    retryTimer = setTimeout(connect, delay);
  }

  var resyncing = false;
  function resync() {
    // Events after our last seq are gone from the log: show the conversation again from what is kept.
    if (resyncing) return;
    resyncing = true;
    resetConversation(true);
    reconnectNow();
  }

  function reconnectNow() {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.close(4000, 'resync');
      return;
    }
    attempt = 0;
    connect();
  }

  window.addEventListener('online', function () { if (!socketReady) { attempt = 0; connect(); } });
  document.addEventListener('visibilitychange', function () {
    if (document.visibilityState === 'visible' && !socketReady && started) { attempt = 0; connect(); }
  });

  // ---- interaction -------------------------------------------------------------------------------------
  var started = false;
  function start() {
    if (started) return;
    started = true;
    state.outbox.forEach(function (item) { delete item.sentOn; showPending(item); });
    connect();
  }

  function setOpen(openIt) {
    panel.hidden = !openIt;
    launcher.setAttribute('aria-expanded', String(openIt));
    state.open = openIt;
    save();
    if (openIt) {
      start();
      unread = 0;
      showUnread();
      if (!log.children.length) greetingNode = notice(greeting, 0);
      input.focus();
      scroll(true);
    } else {
      launcher.focus();
    }
  }

  launcher.addEventListener('click', function () { setOpen(panel.hidden); });
  closeButton.addEventListener('click', function () { setOpen(false); });
  panel.addEventListener('keydown', function (event) {
    if (event.key === 'Escape') { event.preventDefault(); setOpen(false); }
  });

  var typingSentAt = 0;
  var typingOffTimer = null;
  function sendTyping(on) {
    if (!state.conversationId || !socketReady) return;
    transmit({ type: 'typing', conversation_id: state.conversationId, on: on });
  }
  input.addEventListener('input', function () {
    if (!input.value) return;
    if (Date.now() - typingSentAt > TYPING_SEND_MS) { typingSentAt = Date.now(); sendTyping(true); }
    clearTimeout(typingOffTimer);
    typingOffTimer = setTimeout(function () { typingSentAt = 0; sendTyping(false); }, TYPING_SEND_MS + 1000);
  });

  function submit() {
    var text = input.value.trim();
    if (!text) return;
    input.value = '';
    clearTimeout(typingOffTimer);
    if (typingSentAt) { typingSentAt = 0; sendTyping(false); }
    queueMessage(text);
    input.focus();
  }
  sendButton.addEventListener('click', submit);
  input.addEventListener('keydown', function (event) {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) { event.preventDefault(); submit(); }
  });

  humanButton.addEventListener('click', function () {
    if (state.conversationId && socketReady) {
      transmit({ type: 'handoff', conversation_id: state.conversationId, reason: 'visitor', cid: randomId() });
    } else {
      queueMessage(TEXT.handoffText);  // no conversation yet: the keyword starts one and asks for a human
    }
  });

  function mount() {
    document.body.appendChild(host);
    // Returning visitors with a conversation reconnect at once, so agent replies raise the unread badge.
    if (state.open) setOpen(true);
    else if (state.conversationId || state.outbox.length) start();
    showStatus();
  }
  if (document.body) mount(); else document.addEventListener('DOMContentLoaded', mount);
})();
