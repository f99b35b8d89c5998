// What every part of the page shares: element lookup, the page's state, small conversions.
export const $ = (id) => document.getElementById(id);

export const state = {
  job: null, // id of the job this page is following
  abort: null, // AbortController of its event stream
  initImage: null, // data URL of the init image
  initSize: null, // {width, height}
  maskDrawn: false,
  maskFile: null, // data URL of a chosen mask file (wins over painting)
  result: null, // the last result body (GET /jobs/{id}.result)
  request: null, // what the page asked for the job it runs
  asked: null, // what the page asked for the last result
  record: null, // the job record's `request` of the job it runs (GET /jobs/{id}.request)
  resultRecord: null, // the same for the last result: "Reuse these parameters" fills it in
};

// A number field's value; null when empty.
export function numberOf(id) {
  const v = $(id).value.trim();
  return v === '' ? null : Number(v);
}

export function pngSrc(b64) { return `data:image/png;base64,${b64}`; }
