// The embedding map: dots drawn from the JSON the page carries ([x, y, true, predicted, probability, file name,
// base64 JPEG thumbnail] each, x and y in a unit box), one scale for both axes so distances keep their meaning.
(function () {
  var source = document.getElementById("map-data");
  if (!source) { return; }
  var map = JSON.parse(source.textContent);
  var svg = document.getElementById("map-svg"), box = document.getElementById("map");
  var tip = document.getElementById("map-tip"), NS = "http://www.w3.org/2000/svg";
  var points = map.points, W = 960, PAD = 12;
  var xs = points.map(function (p) { return p[0]; }), ys = points.map(function (p) { return p[1]; });
  var minX = Math.min.apply(null, xs), minY = Math.min.apply(null, ys);
  var rx = Math.max(Math.max.apply(null, xs) - minX, 1e-6), ry = Math.max(Math.max.apply(null, ys) - minY, 1e-6);
  var H = Math.round(Math.max(320, Math.min(600, W * ry / rx)));
  var s = Math.min((W - 2 * PAD) / rx, (H - 2 * PAD) / ry);
  var ox = (W - s * rx) / 2 - s * minX, oy = (H - s * ry) / 2 - s * minY;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);

  function show(p, dot) {
    // made on first use: an <img> without a picture would be a broken image on the page until then
    var img = tip.querySelector("img") || tip.insertBefore(document.createElement("img"), tip.firstChild);
    img.alt = "";
    img.src = "data:image/jpeg;base64," + p[6];
    tip.querySelector(".name").textContent = p[5];
    tip.querySelector(".true").textContent = "true: " + map.classes[p[2]];
    tip.querySelector(".pred").textContent = "predicted: " + map.classes[p[3]] + " (" + Math.round(p[4] * 100) + " %)";
    tip.classList.toggle("wrong", p[2] !== p[3]);
    tip.hidden = false;
    var r = dot.getBoundingClientRect(), b = box.getBoundingClientRect();
    var left = r.right - b.left + 8;
    if (left + tip.offsetWidth > b.width) { left = r.left - b.left - tip.offsetWidth - 8; }
    tip.style.left = Math.max(0, left) + "px";
    tip.style.top = Math.max(0, Math.min(r.top - b.top - 10, b.height - tip.offsetHeight)) + "px";
  }
  function hide() { tip.hidden = true; }

  // Wrong predictions last, so their rings are drawn on top.
  var order = points.map(function (p, i) { return i; });
  order.sort(function (a, b) { return (points[a][2] !== points[a][3]) - (points[b][2] !== points[b][3]) || a - b; });
  order.forEach(function (i) {
    var p = points[i], wrong = p[2] !== p[3], dot = document.createElementNS(NS, "circle");
    dot.setAttribute("cx", (ox + s * p[0]).toFixed(1));
    dot.setAttribute("cy", (oy + s * p[1]).toFixed(1));
    dot.setAttribute("r", wrong ? 5.5 : 4.5);
    dot.setAttribute("fill", map.colours[p[2]]);
    dot.setAttribute("class", wrong ? "pt wrong" : "pt");
    dot.setAttribute("data-c", p[2]);
    dot.setAttribute("tabindex", "0");
    dot.setAttribute("aria-label", p[5] + ": true " + map.classes[p[2]] + ", predicted " + map.classes[p[3]]);
    dot.addEventListener("mouseenter", function () { show(p, dot); });
    dot.addEventListener("focus", function () { show(p, dot); });
    dot.addEventListener("mouseleave", hide);
    dot.addEventListener("blur", hide);
    svg.appendChild(dot);
  });
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") { hide(); } });

  // Pointing at a class in the legend fades the others.
  document.querySelectorAll("#map-legend li[data-c]").forEach(function (item) {
    var c = item.getAttribute("data-c");
    item.addEventListener("mouseenter", function () {
      svg.classList.add("dim");
      svg.querySelectorAll('circle[data-c="' + c + '"]').forEach(function (d) { d.classList.add("hl"); });
    });
    item.addEventListener("mouseleave", function () {
      svg.classList.remove("dim");
      svg.querySelectorAll("circle.hl").forEach(function (d) { d.classList.remove("hl"); });
    });
  });
  document.getElementById("map-only-wrong").addEventListener("change", function (e) {
    svg.classList.toggle("only-wrong", e.target.checked);
  });
})();
