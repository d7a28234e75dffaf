// The doctor's review: every suggestion row has an "apply" box (ticked when the suggestion reaches the cut-off);
// the button writes the manifest from the boxes as they are. Pure functions first, so they can be checked alone.
function reviewedLabels(data, chosen) {
  // data.defaults: {file index: label} the fixed manifest applies; chosen: {file index: label, or null for a box
  // left unticked (the given label stays)}, the boxes on the page. Returns {file index: new label}.
  var labels = {};
  Object.keys(data.defaults).forEach(function (i) { labels[i] = data.defaults[i]; });
  Object.keys(chosen).forEach(function (i) {
    if (chosen[i] === null) { delete labels[i]; } else { labels[i] = chosen[i]; }
  });
  return labels;
}

function reviewedManifest(data, chosen) {
  // data.header and data.rows: [absolute path, label(, split)] of every file, in the data's order.
  var labels = reviewedLabels(data, chosen);
  function field(value) {
    value = String(value);
    return /[",\n\r]/.test(value) ? '"' + value.replace(/"/g, '""') + '"' : value;
  }
  var lines = [data.header.map(field).join(",")];
  data.rows.forEach(function (row, i) {
    var out = row.slice();
    if (Object.prototype.hasOwnProperty.call(labels, i)) { out[1] = labels[i]; }
    lines.push(out.map(field).join(","));
  });
  return lines.join("\n") + "\n";
}

if (typeof document !== "undefined") {
  var source = document.getElementById("review-data");
  var button = document.getElementById("review-download");
  if (source && button) {
    var data = JSON.parse(source.textContent);
    var boxes = document.querySelectorAll("input.apply");
    var count = document.getElementById("review-count");
    var choices = function () {
      var chosen = {};
      boxes.forEach(function (box) { chosen[box.dataset.i] = box.checked ? box.dataset.label : null; });
      return chosen;
    };
    var show = function () { count.textContent = Object.keys(reviewedLabels(data, choices())).length + " relabelled"; };
    boxes.forEach(function (box) { box.addEventListener("change", show); });
    show();
    button.addEventListener("click", function () {
      var link = document.createElement("a");
      link.href = URL.createObjectURL(new Blob([reviewedManifest(data, choices())], {type: "text/csv"}));
      link.download = "reviewed_manifest.csv";
      document.body.appendChild(link);
      link.click();
      link.remove();
    });
  }
}

if (typeof module !== "undefined") { module.exports = {reviewedLabels: reviewedLabels, reviewedManifest: reviewedManifest}; }
