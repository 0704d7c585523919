// Keeps a page live without reloading it by hand: the server sends an event
// on /events whenever results change; an element marked data-live="URL" is
// then fetched again and replaced. Pages work the same without this script.
(function () {
  if (!window.EventSource) return;
  var parts = document.querySelectorAll('[data-live]');
  if (!parts.length) return;
  var source = new EventSource('/events');
  var pending = false;
  source.addEventListener('changed', function () {
    if (pending) return;
    pending = true;
    setTimeout(function () {
      pending = false;
      parts.forEach(function (el) {
        fetch(el.getAttribute('data-live'), { headers: { 'Accept': 'text/html' } })
          .then(function (r) { return r.ok ? r.text() : null; })
          .then(function (html) { if (html !== null) el.innerHTML = html; });
      });
    }, 250);
  });
})();
