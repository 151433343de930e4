package main

import "testing"

func TestCallbackURLFor(t *testing.T) {
	cases := []struct {
		name, listen, url, advertise, apiListen string
		want                                    string
		ok                                      bool
	}{
		{"off", "", "", "", "127.0.0.1:7402", "", true},
		{"url without listen", "", "http://x:1", "", "127.0.0.1:7402", "", false},
		{"from advertise", "0.0.0.0:7403", "", "10.1.2.3:7402", "0.0.0.0:7402", "http://10.1.2.3:7403", true},
		{"from listen", "127.0.0.1:7403", "", "", "127.0.0.1:7402", "http://127.0.0.1:7403", true},
		{"given", "0.0.0.0:7403", "http://agent.example:7403", "", "0.0.0.0:7402", "http://agent.example:7403", true},
		{"no host to derive", "0.0.0.0:7403", "", "", "0.0.0.0:7402", "", false},
		{"bad listen", "7403", "", "10.1.2.3:7402", "", "", false},
	}
	for _, c := range cases {
		got, err := callbackURLFor(c.listen, c.url, c.advertise, c.apiListen)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("%s: callbackURLFor = %q, %v; want %q (ok=%v)", c.name, got, err, c.want, c.ok)
		}
	}
}
