// The checkout return page: ask the server until the verified webhook has made the plan
// active, then say so without a reload. Nothing here changes the plan.
(function () {
  "use strict";
  var note = document.getElementById("activating");
  if (!note || !note.dataset.statusUrl) { return; }
  var url = note.dataset.statusUrl;
  var tries = 0;
  function later(delay) {
    if (tries < 120) {
      setTimeout(check, delay);
    } else {
      note.textContent = "This takes longer than usual. Reload this page in a minute: " +
        "your payment is safe and nothing is charged twice.";
    }
  }
  function check() {
    tries += 1;
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (s) {
        if (s && s.active) {
          document.getElementById("return-title").textContent = "Your plan is active";
          document.getElementById("active-headline").textContent = s.headline;
          document.getElementById("active").hidden = false;
          note.hidden = true;
        } else {
          later(1000);
        }
      })
      .catch(function () { later(2000); });
  }
  check();
}());
