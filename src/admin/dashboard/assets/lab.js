// labgate lab page: redraws <main> from the server every few seconds, without a reload.
// The server renders (and escapes) the HTML; this only fetches and swaps it in.
(function () {
  "use strict";
  var main = document.getElementById("lab");
  var updated = document.getElementById("updated");
  var period = parseInt(document.body.getAttribute("data-refresh-ms"), 10) || 2500;
  var timer = null;

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(tick, ms);
  }

  function tick() {
    if (document.hidden) { return; } // resumes on visibilitychange
    fetch("/?part=main", { cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        main.innerHTML = html;
        document.body.classList.remove("stale");
        updated.textContent = "live · " + new Date().toLocaleTimeString();
        schedule(period);
      })
      .catch(function () {
        document.body.classList.add("stale");
        updated.textContent = "gateway not answering, retrying";
        schedule(period * 2);
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) { schedule(0); }
  });
  updated.textContent = "live · " + new Date().toLocaleTimeString();
  schedule(period);
})();
