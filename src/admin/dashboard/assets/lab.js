// labgate lab page: redraws <main> from the server every few seconds, without a reload.
// The server renders (and escapes) the HTML; this only fetches it and swaps it in when it
// changed. The state line is a live region that changes only when the gateway stops or
// starts answering, so a screen reader is not told every redraw.
(function () {
  "use strict";
  var main = document.getElementById("lab");
  var state = document.getElementById("state");
  var updated = document.getElementById("updated");
  var period = parseInt(document.body.getAttribute("data-refresh-ms"), 10) || 2500;
  var last = null;
  var timer = null;

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(tick, ms);
  }

  function say(text) {
    if (state.textContent !== text) { state.textContent = text; }
  }

  function stamp() {
    updated.textContent = "· " + new Date().toLocaleTimeString();
  }

  function tick() {
    if (document.hidden) { return; } // resumes on visibilitychange
    fetch("/?part=main", { cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        if (html !== last) { main.innerHTML = html; last = html; }
        document.body.classList.remove("stale");
        say("live");
        stamp();
        schedule(period);
      })
      .catch(function () {
        document.body.classList.add("stale");
        say("gateway not answering, retrying");
        schedule(period * 2);
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) { schedule(0); }
  });
  stamp();
  schedule(period);
})();
