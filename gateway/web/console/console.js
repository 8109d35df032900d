/* kefu agent console: the tenant's queue, the agent's conversations, claim / reply / notes / transfer /
   release / close over the live-chat WebSocket. Static, no dependencies; all text set with textContent. */
(function () {
  'use strict';

  var LANG = /^zh/i.test(navigator.language || '') ? 'zh' : 'en';
  var TEXT = {
    en: {
      loginTitle: 'kefu agent console', tenant: 'Tenant', username: 'Username', password: 'Password',
      signIn: 'Sign in', signOut: 'Sign out', appTitle: 'kefu console', sound: 'Sound', queue: 'Waiting',
      mine: 'My conversations', pick: 'Pick a conversation on the left.', claim: 'Claim',
      releaseAi: 'Release to AI', requeue: 'Back to queue', agentId: 'agent id', transfer: 'Transfer',
      closeConv: 'Close', noteMode: 'Private note', canned: 'Canned replies', search: 'Search',
      reply: 'Reply (Enter sends, Shift+Enter new line)', send: 'Send', visitor: 'Visitor', ai: 'AI',
      agent: 'Agent', system: 'System', you: 'you', note: 'Private note', typing: 'Visitor is typing…',
      online: 'online', offline: 'reconnecting…', connecting: 'connecting…', waiting: 'waiting {t}',
      st_ai: 'AI answering', st_waiting_human: 'waiting for an agent', st_human: 'with {name}',
      st_closed: 'closed', conflict: 'Another agent claimed this conversation first.',
      forbidden: 'Not allowed: {m}', failed: '{t} failed: {m}', badLogin: 'Wrong tenant, username or password.',
      loginFailed: 'Sign-in failed ({s}).', newVisitor: 'New visitor waiting', noCanned: 'No canned replies',
      sending: 'sending', empty: '(no messages yet)', readOnly: 'Claim this conversation to reply.',
      noteSent: 'note', expired: 'Your session expired; please sign in again.',
      reasons: { created: 'new', visitor: 'visitor asked', keyword: 'asked for a human', no_answer: 'AI had no answer',
        rule: 'rule', claim: 'claimed', release: 'released', transfer: 'transferred', close: 'closed by agent',
        wait_timeout: 'nobody claimed in time', idle: 'idle', reopen: 'visitor came back' }
    },
    zh: {
      loginTitle: 'kefu 客服工作台', tenant: '租户', username: '用户名', password: '密码', signIn: '登录',
      signOut: '退出', appTitle: 'kefu 客服工作台', sound: '声音提醒', queue: '排队中', mine: '我的会话',
      pick: '从左侧选择一个会话。', claim: '接入', releaseAi: '转回 AI', requeue: '放回队列', agentId: '客服 ID',
      transfer: '转接', closeConv: '结束会话', noteMode: '内部备注', canned: '快捷回复', search: '搜索',
      reply: '回复（回车发送，Shift+回车换行）', send: '发送', visitor: '访客', ai: 'AI', agent: '客服',
      system: '系统', you: '我', note: '内部备注', typing: '访客正在输入…', online: '在线', offline: '正在重连…',
      connecting: '正在连接…', waiting: '已等待 {t}', st_ai: 'AI 接待中', st_waiting_human: '等待人工',
      st_human: '{name} 接待中', st_closed: '已结束', conflict: '该会话已被其他客服接入。',
      forbidden: '无权操作：{m}', failed: '{t} 失败：{m}', badLogin: '租户、用户名或密码错误。',
      loginFailed: '登录失败（{s}）。', newVisitor: '新访客等待接入', noCanned: '没有快捷回复', sending: '发送中',
      empty: '（暂无消息）', readOnly: '接入后才能回复。', noteSent: '备注', expired: '登录已过期，请重新登录。',
      reasons: { created: '新会话', visitor: '访客请求', keyword: '访客要求人工', no_answer: 'AI 无法回答', rule: '规则触发',
        claim: '客服接入', release: '客服释放', transfer: '已转接', close: '客服结束', wait_timeout: '等待超时',
        idle: '长时间无消息', reopen: '访客重新发起' }
    }
  }[LANG];
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
  function randomId() {
    var bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ('0' + b.toString(16)).slice(-2); }).join('');
  }
  function claims(token) {
    try {
      var part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      var json = decodeURIComponent(escape(atob(part + '==='.slice((part.length + 3) % 4))));
      return JSON.parse(json) || {};
    } catch (e) { return {}; }
  }

  document.documentElement.lang = LANG === 'zh' ? 'zh-CN' : 'en';
  Array.prototype.forEach.call(document.querySelectorAll('[data-i18n]'), function (node) {
    node.textContent = TEXT[node.getAttribute('data-i18n')];
  });
  Array.prototype.forEach.call(document.querySelectorAll('[data-i18n-placeholder]'), function (node) {
    node.placeholder = TEXT[node.getAttribute('data-i18n-placeholder')];
    node.setAttribute('aria-label', node.placeholder);
  });

  // ---- session: the token comes from the URL fragment (never sent to a server) or from the login form -----
  var TOKEN_KEY = 'kefu-console';
  var knowledge = window.kefuKnowledge || null;  // knowledge.js: the Knowledge page and the sources of AI answers
  var session = null;  // {token, me, name, tenant}

  function takeFragmentToken() {
    var match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (!match) return null;
    history.replaceState(null, '', location.pathname + location.search);
    return decodeURIComponent(match[1]);
  }

  function startSession(token, agent) {
    var c = claims(token);
    session = { token: token, me: (agent && agent.id) || c.sub, name: (agent && agent.name) || c.name || c.sub,
      tenant: c.tenant || '' };
    try { sessionStorage.setItem(TOKEN_KEY, JSON.stringify(session)); } catch (e) { /* memory only */ }
    $('login').hidden = true;
    $('app').hidden = false;
    $('me').textContent = session.name + (session.tenant ? ' · ' + session.tenant : '');
    if (knowledge) knowledge.start(token, c.role || (agent && agent.role) || '', function () { signOut(TEXT.expired); });
    connect();
    loadMine();
  }

  function signOut(message) {
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* nothing stored */ }
    session = null;
    if (knowledge) knowledge.stop();
    if (ws) { var old = ws; ws = null; old.close(1000, 'signed out'); }
    clearTimeout(retryTimer);
    $('app').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message || '';
  }

  $('login-form').addEventListener('submit', function (event) {
    event.preventDefault();
    var form = event.target;
    $('login-error').textContent = '';
    fetch('/v1/console/login', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, credentials: 'omit',
      body: JSON.stringify({ tenant: form.tenant.value.trim(), username: form.username.value.trim(),
        password: form.password.value })
    }).then(function (response) {
      if (response.status === 401 || response.status === 403) throw new Error(TEXT.badLogin);
      if (!response.ok) throw new Error(t('loginFailed', { s: response.status }));
      return response.json();
    }).then(function (body) {
      form.password.value = '';
      startSession(body.token, body.agent);
    }, function (error) { $('login-error').textContent = error.message; });
  });
  $('logout').addEventListener('click', function () { signOut(''); });

  function api(path) {
    return fetch(path, { headers: { Authorization: 'Bearer ' + session.token }, credentials: 'omit' })
      .then(function (response) {
        if (response.status === 401) { signOut(TEXT.expired); throw new Error('unauthorized'); }
        if (!response.ok) throw new Error(path + ': HTTP ' + response.status);
        return response.json();
      });
  }

  // ---- conversations -------------------------------------------------------------------------------------
  var conversations = {};  // id -> {id, status, assignee, assigneeName, events: {seq: event}, lastSeq, ...}
  var queue = [];          // [{conversation_id, waiting_since, preview}] as the edge sent it, oldest first
  var knownWaiting = {};
  var selected = null;

  function conversation(id) {
    return conversations[id] || (conversations[id] = {
      id: id, status: null, assignee: null, assigneeName: null, events: {}, lastSeq: 0, unread: 0,
      streams: {}, pending: {}, typing: false, preview: '', loaded: false
    });
  }
  function isMine(conv) { return conv.status === 'human' && conv.assignee === session.me; }

  function addEvent(id, event) {
    var conv = conversation(id);
    if (typeof event.seq !== 'number' || conv.events[event.seq]) return false;
    conv.events[event.seq] = event;
    if (event.seq > conv.lastSeq) conv.lastSeq = event.seq;
    if (event.type === 'state') {
      var wasMine = isMine(conv);
      if (event.seq >= (conv.stateSeq || 0)) {
        conv.stateSeq = event.seq;
        conv.status = event.status;
        conv.assignee = event.assignee || null;
        conv.assigneeName = event.assignee_name || event.assignee || null;
      }
      if (wasMine !== isMine(conv)) renderMine();
    } else if (event.type === 'msg') {
      if (event.sender && event.sender.type === 'visitor') conv.preview = event.text;
      if (event.message_id) delete conv.streams[event.message_id];
      if (event.cid) delete conv.pending[event.cid];
      if (id !== selected || document.hidden) { conv.unread++; renderMine(); }
    }
    if (id === selected) renderEvent(conv, event);
    return true;
  }

  function loadHistory(id) {
    // Pages of stored events after the last one we hold; merged by seq, so a page that overlaps live
    // frames doubles nothing.
    var conv = conversation(id);
    var pages = 0;
    function page(after) {
      return api('/v1/conversations/' + encodeURIComponent(id) + '/events?after_seq=' + after).then(function (body) {
        var events = Array.isArray(body) ? body : (body.events || []);
        events.forEach(function (event) {
          event.conversation_id = event.conversation_id || id;
          addEvent(id, event);
        });
        conv.loaded = true;
        if (body.status && !conv.status) { conv.status = body.status; renderHeader(); }
        var next = body.next_after_seq;
        var more = body.has_more || (typeof next === 'number' && next > after && events.length > 0);
        if (more && ++pages < 100) return page(typeof next === 'number' ? next : conv.lastSeq);
        if (id === selected) renderHeader();
        return null;
      });
    }
    return page(conv.lastSeq).catch(function (error) { if (window.console) console.warn('kefu:', error.message); });
  }

  function loadMine() {
    api('/v1/conversations?status=human&assignee=' + encodeURIComponent(session.me)).then(function (body) {
      var list = Array.isArray(body) ? body : (body.conversations || []);
      list.forEach(function (item) {
        var conv = conversation(item.conversation_id || item.id);
        conv.status = conv.status || item.status || 'human';
        conv.assignee = conv.assignee || item.assignee || session.me;
        conv.assigneeName = conv.assigneeName || item.assignee_name || null;
        if (item.preview) conv.preview = item.preview;
        loadHistory(conv.id);
      });
      renderMine();
    }, function (error) { if (window.console) console.warn('kefu:', error.message); });
  }

  // ---- rendering -----------------------------------------------------------------------------------------
  function senderLabel(sender) {
    if (!sender) return TEXT.system;
    if (sender.type === 'visitor') return TEXT.visitor;
    if (sender.type === 'ai') return TEXT.ai;
    if (sender.type === 'agent') {
      var name = sender.name || sender.id || TEXT.agent;
      return sender.id === session.me ? name + ' (' + TEXT.you + ')' : name;
    }
    return TEXT.system;
  }

  function messageNode(event) {
    var note = event.type === 'note';
    var sender = event.sender || { type: 'system' };
    var type = ['visitor', 'ai', 'agent', 'system'].indexOf(sender.type) >= 0 ? sender.type : 'system';
    var node = el('div', { class: 'msg' + (note ? ' note' : ''), 'data-testid': note ? 'console-note' : 'console-message',
      'data-sender': type }, [
      el('div', { class: 'who', text: note ? TEXT.note + ' · ' + senderLabel(sender) : senderLabel(sender) }),
      el('div', { class: 'text', text: event.text }),
      type === 'ai' && knowledge ? knowledge.sources(event.citations, 'console-citation') : null,
      el('div', { class: 'meta', text: event.ts ? new Date(event.ts > 1e12 ? event.ts : event.ts * 1000)
        .toLocaleTimeString() : '' })
    ]);
    if (event.message_id) node.setAttribute('data-message-id', event.message_id);
    return node;
  }

  function stateNotice(event) {
    return el('div', { class: 'notice', 'data-testid': 'console-notice', text: statusText(event.status,
      event.assignee_name || event.assignee) + (event.reason ? ' · ' + (TEXT.reasons[event.reason] || event.reason) : '') });
  }

  function placeIn(history, node, seq) {
    var stick = history.scrollHeight - history.scrollTop - history.clientHeight < 60;
    if (seq !== undefined) {
      node.setAttribute('data-seq', String(seq));
      var children = history.children;
      for (var i = 0; i < children.length; i++) {
        var other = children[i].getAttribute('data-seq');
        if (other === null || Number(other) > seq) { history.insertBefore(node, children[i]); break; }
      }
      if (!node.parentNode) history.appendChild(node);
    } else {
      history.appendChild(node);
    }
    if (stick) history.scrollTop = history.scrollHeight;
  }

  function renderEvent(conv, event) {
    var history = $('history');
    var node;
    if (event.type === 'msg' || event.type === 'note') {
      var old = (event.cid && history.querySelector('[data-cid="' + event.cid + '"]')) ||
        (event.message_id && history.querySelector('[data-streaming][data-message-id="' + event.message_id + '"]'));
      if (old) history.removeChild(old);
      node = messageNode(event);
      if (event.sender && event.sender.type === 'visitor') showTyping(conv, false);
    } else if (event.type === 'state') {
      node = stateNotice(event);
      renderHeader();
    } else {
      return;
    }
    placeIn(history, node, event.seq);
  }

  function renderConversation() {
    var conv = conversations[selected];
    $('empty').hidden = !!conv;
    $('conversation').hidden = !conv;
    if (!conv) return;
    var history = $('history');
    history.textContent = '';
    Object.keys(conv.events).map(Number).sort(function (a, b) { return a - b; }).forEach(function (seq) {
      renderEvent(conv, conv.events[seq]);
    });
    Object.keys(conv.pending).forEach(function (cid) { placeIn(history, pendingNode(conv.pending[cid])); });
    Object.keys(conv.streams).forEach(function (id) { placeIn(history, streamNode(id, conv.streams[id])); });
    history.scrollTop = history.scrollHeight;
    showTyping(conv, conv.typing);
    renderHeader();
  }

  function statusText(status, name) {
    if (status === 'human') return t('st_human', { name: name || TEXT.agent });
    if (status === 'waiting_human' || status === 'ai' || status === 'closed') return TEXT['st_' + status];
    return status || '';
  }

  function renderHeader() {
    var conv = conversations[selected];
    if (!conv) return;
    var inQueue = queue.some(function (item) { return item.conversation_id === conv.id; });
    var status = conv.status || (inQueue ? 'waiting_human' : '');
    $('conv-title').textContent = conv.id.slice(0, 12);
    $('conv-status').textContent = statusText(status, conv.assigneeName);
    $('conv-status').setAttribute('data-status', status);
    var mine = isMine(conv);
    $('claim').hidden = mine;
    $('claim').disabled = !(status === 'waiting_human' || status === 'ai' || status === 'closed' || inQueue);
    ['release', 'requeue', 'close', 'transfer', 'transfer-agent', 'send'].forEach(function (id) {
      $(id).disabled = !mine;
    });
    $('input').disabled = !mine && !$('note-mode').checked;
    $('send').disabled = $('input').disabled;
    $('input').placeholder = mine || $('note-mode').checked ? TEXT.reply : TEXT.readOnly;
  }

  function waitedFor(since) {
    var ms = Date.now() - (typeof since === 'number' ? (since > 1e12 ? since : since * 1000) : Date.parse(since));
    var s = Math.max(0, Math.floor(ms / 1000) || 0);
    return s < 60 ? s + 's' : Math.floor(s / 60) + 'm ' + (s % 60) + 's';
  }

  function listItem(id, testid, first, second, extra) {
    var li = el('li', { tabindex: '0', 'data-testid': testid, 'data-conversation-id': id,
      'aria-current': String(id === selected) }, [
      el('div', { class: 'line' }, [el('span', { class: 'preview', text: first }), extra]),
      second ? el('div', { class: 'preview', text: second }) : null
    ]);
    li.addEventListener('click', function () { select(id); });
    li.addEventListener('keydown', function (event) {
      if (event.key === 'Enter' || event.key === ' ') { event.preventDefault(); select(id); }
    });
    return li;
  }

  function renderQueue() {
    var list = $('queue');
    list.textContent = '';
    queue.forEach(function (item) {
      list.appendChild(listItem(item.conversation_id, 'console-queue-item', item.preview || '…', null,
        el('span', { class: 'wait', 'data-since': String(item.waiting_since),
          text: t('waiting', { t: waitedFor(item.waiting_since) }) })));
    });
    $('queue-count').textContent = String(queue.length);
    $('queue-count').setAttribute('data-n', String(queue.length));
  }

  function renderMine() {
    var list = $('mine');
    list.textContent = '';
    Object.keys(conversations).forEach(function (id) {
      var conv = conversations[id];
      if (!isMine(conv)) return;
      list.appendChild(listItem(id, 'console-mine-item', conv.preview || id.slice(0, 12), null,
        conv.unread ? el('span', { class: 'unread', text: String(conv.unread) }) : null));
    });
  }

  setInterval(function () {
    Array.prototype.forEach.call(document.querySelectorAll('.wait[data-since]'), function (node) {
      var since = node.getAttribute('data-since');
      node.textContent = t('waiting', { t: waitedFor(/^\d+(\.\d+)?$/.test(since) ? Number(since) : since) });
    });
  }, 1000);

  function select(id) {
    selected = id;
    var conv = conversation(id);
    conv.unread = 0;
    renderQueue();
    renderMine();
    renderConversation();
    if (!conv.loaded) loadHistory(id);
    markRead(conv);
    $('input').focus();
  }

  function showTyping(conv, on) {
    conv.typing = on;
    clearTimeout(conv.typingTimer);
    if (on) conv.typingTimer = setTimeout(function () { showTyping(conv, false); }, 6000);
    if (conv.id === selected) $('typing').textContent = on ? TEXT.typing : '';
  }

  function streamNode(messageId, text) {
    var node = messageNode({ type: 'msg', sender: { type: 'ai' }, text: text, message_id: messageId });
    node.setAttribute('data-streaming', '');
    return node;
  }

  function pendingNode(item) {
    var node = messageNode({ type: item.type, sender: { type: 'agent', id: session.me, name: session.name },
      text: item.text });
    node.setAttribute('data-pending', '');
    node.setAttribute('data-cid', item.cid);
    node.querySelector('.meta').textContent = TEXT.sending;
    return node;
  }

  // ---- title flash and sound when a visitor starts waiting -----------------------------------------------
  var baseTitle = document.title;
  var flashTimer = null;
  var audio = null;
  function alertNewVisitor() {
    if (!flashTimer && (document.hidden || !document.hasFocus())) {
      var on = false;
      flashTimer = setInterval(function () {
        on = !on;
        document.title = on ? '(' + queue.length + ') ' + TEXT.newVisitor : baseTitle;
      }, 1000);
    }
    if (audio) beep();
  }
  function stopFlash() {
    clearInterval(flashTimer);
    flashTimer = null;
    document.title = baseTitle;
  }
  window.addEventListener('focus', stopFlash);
  document.addEventListener('visibilitychange', function () {
    if (!document.hidden) {
      stopFlash();
      if (selected) markRead(conversation(selected));
    }
    if (!document.hidden && session && !ready) { attempt = 0; connect(); }
  });
  $('sound').addEventListener('change', function (event) {
    // Created on the click, as browsers allow audio only after a gesture; the tone is synthesised, no file.
    if (event.target.checked && !audio && (window.AudioContext || window.webkitAudioContext)) {
      audio = new (window.AudioContext || window.webkitAudioContext)();
      beep();
    } else if (!event.target.checked && audio) {
      audio.close();
      audio = null;
    }
  });
  function beep() {
    var now = audio.currentTime;
    [0, 0.18].forEach(function (offset, index) {
      var osc = audio.createOscillator();
      var gain = audio.createGain();
      osc.frequency.value = index ? 1175 : 880;
      gain.gain.setValueAtTime(0.0001, now + offset);
      gain.gain.exponentialRampToValueAtTime(0.2, now + offset + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, now + offset + 0.15);
      osc.connect(gain).connect(audio.destination);
      osc.start(now + offset);
      osc.stop(now + offset + 0.16);
    });
  }

  var toastTimer = null;
  function toast(text) {
    $('toast').textContent = text;
    $('toast').hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { $('toast').hidden = true; }, 5000);
  }

  // ---- the WebSocket -------------------------------------------------------------------------------------
  var ws = null;
  var ready = false;
  var attempt = 0;
  var retryTimer = null;
  var pingTimer = null;
  var lastFrameAt = 0;
  var heartbeatMs = 25000;

  function setConnection(state) {
    $('connection').setAttribute('data-state', state);
    $('connection').textContent = TEXT[state];
  }

  function connect() {
    if (!session || (ws && ws.readyState <= WebSocket.OPEN)) return;
    clearTimeout(retryTimer);
    setConnection(attempt ? 'offline' : 'connecting');
    var socket = ws = new WebSocket(location.origin.replace(/^http/, 'ws') + '/v1/ws');
    socket.onopen = function () {
      var resume = Object.keys(conversations).filter(function (id) { return isMine(conversations[id]); })
        .slice(0, 32).map(function (id) { return { conversation_id: id, after_seq: conversations[id].lastSeq }; });
      socket.send(JSON.stringify({ type: 'hello', token: session.token, resume: resume }));
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
      ready = false;
      clearInterval(pingTimer);
      if (event.code === 4001 || event.code === 4003) { signOut(TEXT.expired); return; }
      setConnection('offline');
      var ceiling = Math.min(30000, 500 * Math.pow(2, attempt));
      attempt = Math.min(attempt + 1, 10);
      retryTimer = setTimeout(connect, Math.round(ceiling / 2 + Math.random() * ceiling / 2));
    };
  }
  window.addEventListener('online', function () { if (session && !ready) { attempt = 0; connect(); } });

  function transmit(frame) {
    if (ws && ready) { ws.send(JSON.stringify(frame)); return true; }
    return false;
  }

  function handle(frame) {
    var id = frame.conversation_id;
    switch (frame.type) {
      case 'welcome':
        ready = true;
        attempt = 0;
        setConnection('online');
        heartbeatMs = Math.max(5000, (frame.heartbeat_s || 25) * 1000);
        clearInterval(pingTimer);
        pingTimer = setInterval(function () {
          if (Date.now() - lastFrameAt > 2 * heartbeatMs + 5000) { if (ws) ws.close(4000, 'heartbeat lost'); return; }
          transmit({ type: 'ping' });
        }, heartbeatMs);
        // Whatever happened while away: fill each held conversation from the events API (merged by seq).
        Object.keys(conversations).forEach(function (cid) {
          if (isMine(conversations[cid]) || cid === selected) loadHistory(cid);
        });
        resend();
        break;
      case 'queue_update':
        var fresh = false;
        queue = (frame.conversations || []).slice();
        var waiting = {};
        queue.forEach(function (item) {
          waiting[item.conversation_id] = true;
          if (!knownWaiting[item.conversation_id]) fresh = true;
          var conv = conversation(item.conversation_id);
          if (!conv.status || conv.status === 'ai') conv.status = 'waiting_human';
          if (item.preview) conv.preview = item.preview;
        });
        knownWaiting = waiting;
        renderQueue();
        if (selected) renderHeader();
        if (fresh) alertNewVisitor();
        break;
      case 'msg': case 'state': case 'note':
        if (id && addEvent(id, frame) && frame.type === 'msg' && id === selected) markRead(conversation(id));
        break;
      case 'ai_delta':
        if (!id) break;
        var conv = conversation(id);
        conv.streams[frame.message_id] = (conv.streams[frame.message_id] || '') + frame.delta;
        if (id === selected) {
          var node = $('history').querySelector('[data-streaming][data-message-id="' + frame.message_id + '"]');
          if (node) node.querySelector('.text').textContent = conv.streams[frame.message_id];
          else placeIn($('history'), streamNode(frame.message_id, conv.streams[frame.message_id]));
        }
        break;
      case 'typing':
        if (id && (!frame.sender || frame.sender.type === 'visitor')) showTyping(conversation(id), frame.on !== false);
        break;
      case 'ack':
        onAck(frame);
        break;
      case 'nack':
        onNack(frame);
        break;
      case 'resync':
        if (id) {
          var again = conversation(id);
          again.events = {};
          again.lastSeq = 0;
          loadHistory(id).then(function () {
            // Nothing left to load: the conversation was deleted. It leaves the list of mine.
            if (!again.lastSeq) { again.status = 'closed'; renderMine(); }
            if (id === selected) { renderConversation(); renderHeader(); }
          });
        }
        break;
      case 'error':
        if (window.console) console.warn('kefu:', frame.code, frame.message);
        break;
    }
  }

  // Requests awaiting their ack: {cid: {type, conversation_id, text?}}. Messages and notes are resent
  // with the same cid after a reconnect (the edge stores a cid once).
  var outbox = {};

  function request(frame) {
    frame.cid = frame.cid || randomId();
    outbox[frame.cid] = frame;
    transmit(frame);
    return frame.cid;
  }

  function resend() {
    Object.keys(outbox).forEach(function (cid) {
      var frame = outbox[cid];
      if (frame.type === 'send' || frame.type === 'note') transmit(frame);
      else delete outbox[cid];  // a claim or release from before the drop: the state now says what happened
    });
  }

  function onAck(frame) {
    var sent = outbox[frame.cid];
    delete outbox[frame.cid];
    if (!sent) return;
    if (sent.type === 'claim') {
      var conv = conversation(sent.conversation_id);
      loadHistory(conv.id);
    }
  }

  function onNack(frame) {
    var sent = frame.cid ? outbox[frame.cid] : null;
    if (frame.cid) delete outbox[frame.cid];
    if (sent && (sent.type === 'send' || sent.type === 'note')) {
      var conv = conversation(sent.conversation_id);
      delete conv.pending[frame.cid];
      if (sent.conversation_id === selected) renderConversation();
    }
    var kind = frame.request_type || (sent && sent.type) || '';
    if (frame.code === 'claim_conflict') toast(TEXT.conflict);
    else if (frame.code === 'forbidden') toast(t('forbidden', { m: frame.message || kind }));
    else if (kind !== 'typing' && kind !== 'read') toast(t('failed', { t: kind, m: frame.message || frame.code }));
  }

  function markRead(conv) {
    if (!isMine(conv) || document.hidden || !conv.lastSeq || conv.readSeq === conv.lastSeq) return;
    conv.readSeq = conv.lastSeq;
    transmit({ type: 'read', conversation_id: conv.id, up_to_seq: conv.lastSeq });
  }

  // ---- actions -------------------------------------------------------------------------------------------
  $('claim').addEventListener('click', function () {
    if (selected) request({ type: 'claim', conversation_id: selected });
  });
  $('release').addEventListener('click', function () {
    if (selected) request({ type: 'release', conversation_id: selected, to: 'ai' });
  });
  $('requeue').addEventListener('click', function () {
    if (selected) request({ type: 'release', conversation_id: selected, to: 'queue' });
  });
  $('close').addEventListener('click', function () {
    if (selected) request({ type: 'close', conversation_id: selected });
  });
  $('transfer-form').addEventListener('submit', function (event) {
    event.preventDefault();
    var agent = $('transfer-agent').value.trim();
    if (selected && agent) {
      request({ type: 'transfer', conversation_id: selected, agent: agent });
      $('transfer-agent').value = '';
    }
  });
  $('note-mode').addEventListener('change', function (event) {
    document.querySelector('.composer').classList.toggle('note', event.target.checked);
    renderHeader();
  });

  function submit() {
    var text = $('input').value.trim();
    if (!text || !selected) return;
    var conv = conversation(selected);
    var note = $('note-mode').checked;
    if (!note && !isMine(conv)) return;
    $('input').value = '';
    stopTyping();
    var frame = { type: note ? 'note' : 'send', conversation_id: selected, text: text, cid: randomId() };
    conv.pending[frame.cid] = frame;
    placeIn($('history'), pendingNode(frame));
    request(frame);
    $('input').focus();
  }
  $('send').addEventListener('click', submit);
  $('input').addEventListener('keydown', function (event) {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) { event.preventDefault(); submit(); }
  });

  var typingSentAt = 0;
  var typingOff = null;
  $('input').addEventListener('input', function () {
    var conv = selected && conversations[selected];
    if (!conv || !isMine(conv) || $('note-mode').checked || !$('input').value) return;
    if (Date.now() - typingSentAt > 3000) {
      typingSentAt = Date.now();
      transmit({ type: 'typing', conversation_id: conv.id, on: true });
    }
    clearTimeout(typingOff);
    typingOff = setTimeout(stopTyping, 4000);
  });
  function stopTyping() {
    clearTimeout(typingOff);
    if (typingSentAt && selected) transmit({ type: 'typing', conversation_id: selected, on: false });
    typingSentAt = 0;
  }

  // Canned replies: searched on the edge, inserted into the reply box (never sent unseen).
  var cannedTimer = null;
  $('canned-toggle').addEventListener('click', function () {
    $('canned').hidden = !$('canned').hidden;
    if (!$('canned').hidden) { $('canned-q').focus(); searchCanned(); }
  });
  $('canned-q').addEventListener('input', function () {
    clearTimeout(cannedTimer);
    cannedTimer = setTimeout(searchCanned, 200);
  });
  $('canned-q').addEventListener('keydown', function (event) {
    if (event.key === 'Escape') { $('canned').hidden = true; $('input').focus(); }
    if (event.key === 'ArrowDown') { var first = $('canned-list').querySelector('li'); if (first) first.focus(); }
  });
  function searchCanned() {
    api('/v1/canned-replies?q=' + encodeURIComponent($('canned-q').value.trim())).then(function (body) {
      var replies = Array.isArray(body) ? body : (body.replies || body.canned_replies || body.items || []);
      var list = $('canned-list');
      list.textContent = '';
      if (!replies.length) list.appendChild(el('li', { class: 'none', text: TEXT.noCanned }));
      replies.forEach(function (reply) {
        var text = reply.text || reply.body || '';
        var li = el('li', { tabindex: '0', 'data-testid': 'console-canned-item' }, [
          el('b', { text: reply.title || reply.shortcut || '' }), el('span', { text: text })]);
        function choose() {
          $('input').value = text;
          $('canned').hidden = true;
          $('input').focus();
        }
        li.addEventListener('click', choose);
        li.addEventListener('keydown', function (event) {
          if (event.key === 'Enter') { event.preventDefault(); choose(); }
          if (event.key === 'ArrowDown' && li.nextSibling) li.nextSibling.focus();
          if (event.key === 'ArrowUp') (li.previousSibling || $('canned-q')).focus();
        });
        list.appendChild(li);
      });
    }, function () {
      $('canned-list').textContent = '';
      $('canned-list').appendChild(el('li', { class: 'none', text: TEXT.noCanned }));
    });
  }

  // ---- start ---------------------------------------------------------------------------------------------
  var fragment = takeFragmentToken();
  var stored = null;
  try { stored = JSON.parse(sessionStorage.getItem(TOKEN_KEY) || 'null'); } catch (e) { stored = null; }
  if (fragment) startSession(fragment, null);
  else if (stored && stored.token && (claims(stored.token).exp || 0) * 1000 > Date.now()) {
    startSession(stored.token, { id: stored.me, name: stored.name });
  } else {
    $('login').hidden = false;
  }
})();
