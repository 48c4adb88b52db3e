// Refresh the live part of a page (main[data-refresh="seconds"]) in place: fetch the same
// page, swap <main>. Plain JavaScript, no library; stops while the tab is hidden.
(function () {
  "use strict";
  var main = document.querySelector("main[data-refresh]");
  if (!main) { return; }
  var seconds = Math.max(3, parseInt(main.getAttribute("data-refresh"), 10) || 10);
  function refresh() {
    if (document.hidden) { return; }
    fetch(window.location.href, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (response) {
        if (response.redirected || !response.ok) { window.location.reload(); return null; }
        return response.text();
      })
      .then(function (html) {
        if (!html) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        if (fresh) { main.innerHTML = fresh.innerHTML; }
      })
      .catch(function () { /* offline for a moment: try again next tick */ });
  }
  window.setInterval(refresh, seconds * 1000);
}());
