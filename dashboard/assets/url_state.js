/* dynalens dashboard: write the view into the URL's query string without navigating (see url_state.py). */
window.dynalensUrl = {
  /* A control's value as one query value: a string as is, anything else as JSON; null drops the key. */
  encode(value) {
    if (value === null || value === undefined) { return null; }
    return typeof value === 'string' ? value : JSON.stringify(value);
  },
  /* Set each key (a string, a list of strings for a repeated key, or null to remove it); keep the others. */
  write(entries) {
    const url = new URL(window.location.href);
    Object.entries(entries).forEach(([key, value]) => {
      url.searchParams.delete(key);
      if (value === null || value === undefined) { return; }
      (Array.isArray(value) ? value : [value]).forEach(v => url.searchParams.append(key, v));
    });
    if (url.href !== window.location.href) {
      window.history.replaceState(window.history.state, '', url.href);
    }
    return url.search;
  },
};
