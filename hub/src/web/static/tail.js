// Appends a running job's log on its run page: polls the log API from the
// page's end (data-next) and adds what the job wrote since; stops when the
// job has finished (then reloads once, to show how it ended). Without this
// script the page offers a "reload" link instead.
(function () {
  var pre = document.getElementById('run-log');
  if (!pre || pre.getAttribute('data-tail') !== 'yes' || !window.fetch) return;
  var next = Number(pre.getAttribute('data-next'));
  var url = pre.getAttribute('data-log');
  function poll() {
    fetch(url + '&limit=262144&offset=' + next, { headers: { 'Accept': 'application/json' } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (page) {
        if (!page) { setTimeout(poll, 5000); return; }
        var atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        if (page.text) pre.appendChild(document.createTextNode(page.text));
        next = page.next_offset;
        if (atBottom) pre.scrollTop = pre.scrollHeight;
        if (page.next_offset < page.total) { poll(); return; }
        if (page.running) { setTimeout(poll, 2000); return; }
        window.location.reload();
      })
      .catch(function () { setTimeout(poll, 5000); });
  }
  setTimeout(poll, 2000);
})();
